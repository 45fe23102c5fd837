"""The warp-specialized Gluon QAT kernel (FP8 and NVFP4 forms) without a GPU: every configuration moeq may launch
compiles for sm_90 with this Triton's compiler and ptxas and fits Hopper's shared memory without register spills;
operands it cannot take are named; the opaque ops' fakes give the output a compiled graph plans for. Its numerics
run on the GPU (``tests/test_gpu.py::test_qat_fp8_gluon_gemm_cuda`` and ``test_qat_nvfp4_gluon_gemm_cuda``): Gluon
has no interpreter."""

from __future__ import annotations

import pytest
import torch

from moeq.runtime.kernels import grouped_qmm as launcher

gluon_module = pytest.importorskip("moeq.runtime.kernels.qat_gluon", reason="this Triton has no Gluon")

#: dynamic shared memory an sm_90 block may use (227 KB)
HOPPER_SHARED_BYTES = 232448


def assert_wgmmas(kernel, config) -> None:
    """In the SASS (disassembled once):

    - ptxas kept the MMA partition's wgmmas in flight: it waits for all of them (``WARPGROUP.DEPBAR.LE gsb0, 0x0``)
      only after each branch's k-loop, two in all. Serialized, it waits after every wgmma (ptxas's C7514 / C7515
      notes, which an accumulator copied across a branch once caused);
    - a stacked configuration's main rows run wgmmas as wide as the tile (``64 x bn``), its tail rows as wide as a
      warpgroup's share of the columns (warpgroups side by side); otherwise every wgmma is that share;
    - a swapped one (the product's transpose) waits once after each of its four branches' k-loops, and its wgmmas
      are half the main rows wide, and 16, 32 or 64 rows for the tails."""
    import re

    sass = gluon_module.sass(kernel.asm["cubin"])
    widths = {int(n) for n in re.findall(r"[HQ]GMMA\.64x(\d+)x", sass)}
    if config.swap:  # four branches (no tail, tails of 16, 32 and 64 rows); the main rows in two halves
        assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 4
        assert widths == {config.bm // 2, 16, 32, config.bt}, widths
        return
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 2
    share = config.bn // max(1, config.mma_warps // 4)
    assert widths == ({config.bn, share} if config.stacked else {share}), widths


#: the kernels ``tuned_config`` chooses from (a persistent configuration launches the same kernel on fewer programs)
KERNELS = sorted({config._replace(persistent=False) for config in gluon_module.CONFIGS})


@pytest.mark.parametrize("config", KERNELS, ids=lambda c: c.name)
def test_every_config_compiles_for_sm90(config, tmp_path, monkeypatch):
    """Each configuration ``tuned_config`` chooses from: shared memory within Hopper's 227 KB, the converter's
    e4m3 conversions and the MMA partition's FP8 wgmma in the PTX, one register budget per warp role
    (``setmaxnreg``), nothing spilled to local memory, the exact quotient (no reciprocal-only variant), and wgmmas
    not serialized; compiled for 256 experts (DeepSeek-V3), the most registers the partitions' scan of every
    expert's offsets takes (128 experts, compiled as well until session 55, passed the same checks in every run)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = config.compile_for_sm90(x_per_expert=True, num_experts=256)
    ptx = kernel.asm["ptx"]
    assert config.exact in (1, 2), config
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES, kernel.metadata.shared
    assert "wgmma.mma_async.sync.aligned" in ptx and ".e4m3.e4m3" in ptx
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "fma.rn.f32" in ptx  # Markstein's quotient
    assert "setmaxnreg" in ptx
    assert "st.local" not in ptx
    assert ptx.count("cp.async.bulk.tensor") == 3 and ptx.count("expect_tx") == 3  # whole tails (tail_box 0)
    assert_wgmmas(kernel, config)


@pytest.mark.parametrize(
    "config",
    sorted({c._replace(persistent=False) for c in gluon_module.NVFP4_CONFIGS})
    + [gluon_module.NVFP4_CONFIGS[0]._replace(swap=False, stacked=True)],
    ids=lambda c: c.name,
)
def test_every_nvfp4_config_compiles_for_sm90(config, tmp_path, monkeypatch):
    """The QAT NVFP4 form: within Hopper's shared memory, bf16 wgmma, Markstein's quotient and the e4m3 block
    scales' conversion in the converter, one register budget per role, nothing spilled, wgmmas not serialized. Also
    the stacked arrangement (shipped until session 41, the swap probe's base)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = config.compile_for_sm90()
    ptx = kernel.asm["ptx"]
    assert config.nvfp4 and kernel.metadata.shared <= HOPPER_SHARED_BYTES, kernel.metadata.shared
    assert "wgmma.mma_async.sync.aligned" in ptx and ".bf16.bf16" in ptx
    assert "fma.rn.f32" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "setmaxnreg" in ptx
    assert "st.local" not in ptx
    assert ptx.count("cp.async.bulk.tensor") == 3 and ptx.count("expect_tx") == 3  # whole tails (tail_box 0)
    assert_wgmmas(kernel, config)


@pytest.mark.parametrize(
    "config",
    [gluon_module.CONFIGS[4]._replace(tail_box=16), gluon_module.NVFP4_CONFIGS[1]._replace(tail_box=32)],
    ids=lambda c: c.name,
)
def test_tail_box_configs_compile_for_sm90(config, tmp_path, monkeypatch):
    """Tail rows in ``tail_box``-row TMA boxes: the loader issues the main tile's copy and one per box (each
    predicated on the group's tail rows), one ``expect`` per possible box count (one fires), and the weight's; the
    rest of the kernel compiles as the shipped configuration's (shared memory, no spills)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = config.compile_for_sm90()
    ptx = kernel.asm["ptx"]
    boxes = config.bt // config.tail_box
    assert ptx.count("cp.async.bulk.tensor") == 2 + boxes
    assert ptx.count("expect_tx") == 1 + boxes + 1
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES and "st.local" not in ptx


def k_loops(sass: str) -> list[list[str]]:
    """The instructions of each k-loop in ``sass`` (``triton.tools.disasm.get_sass``'s listing: ``LBB<n>:`` labels, one
    instruction a line after its control codes): a backward branch's body that issues wgmmas, loads nothing from
    global memory and stores nothing (the tile loop around it loads the expert's offsets and amax and stores the
    tile; under Triton 3.6 its loads may be hoisted out, so its stores tell it apart)."""
    import re

    code, labels, loops = [], {}, []
    for line in sass.splitlines():
        if re.fullmatch(r"\w+:", line.strip()):
            labels[line.strip()[:-1]] = len(code)
        elif "\t" in line:
            code.append(line.split("\t", 1)[1].strip())
            target = re.search(r"BRA\W*(\w+)", code[-1])
            if target and target.group(1) in labels:
                body = code[labels[target.group(1)] :]
                stores = any(re.match(r"(@!?\w+ )?(STG|STSM)\b", t) for t in body)
                if any("GMMA" in t for t in body) and not any("LDG" in t for t in body) and not stores:
                    loops.append(body)
    return loops


#: opcodes whose first operand is not a register they write
_NO_REGISTER_DESTINATION = ("ST", "BRA", "BAR", "SYNCS", "RED", "ATOM", "HGMMA", "WARP", "NOP", "DEPBAR", "EXIT", "RET",
                            "CALL", "BSYNC", "BSSY", "ISETP", "FSETP", "HSETP", "PLOP", "R2UR", "UMOV", "ULDC")  # fmt: skip


def _a_registers(hgmma: str) -> set[int]:
    """The registers a register-operand ``HGMMA`` reads as its A operand (four a thread)."""
    import re

    operand = re.search(r"HGMMA\S* R\d+, R(\d+),", hgmma)
    return set(range(int(operand[1]), int(operand[1]) + 4)) if operand else set()


def writes_to_in_flight_registers(loop: list[str]) -> list[str]:
    """The instructions of a k-loop (twice around it) that write a register an issued, not yet retired ``HGMMA`` reads
    as its register A operand. A wgmma group ends at the ``HGMMA`` marked ``gsb0``; ``WARPGROUP.DEPBAR.LE gsb0, N``
    retires all but the newest N groups. PTX leaves such a write undefined; sessions 37-38 saw one corrupt products on
    the H100."""
    import re

    groups, current, hits = [], set(), []
    for instruction in loop + loop:
        if "HGMMA" in instruction:
            current |= _a_registers(instruction)
            if "gsb0" in instruction:
                groups, current = [*groups, current], set()
            continue
        wait = re.search(r"DEPBAR\.LE gsb0, 0x(\d+)", instruction)
        if wait:
            keep = int(wait[1], 16)
            groups = groups[len(groups) - keep :] if keep else []
            continue
        words = instruction.rstrip(";").split()
        words = words[1:] if words and words[0].startswith("@") else words
        if len(words) < 2 or words[0].startswith(_NO_REGISTER_DESTINATION):
            continue
        destination = re.fullmatch(r"R(\d+),?", words[1])
        width = 4 if ".128" in words[0] else 2 if ".64" in words[0] else 1
        in_flight = set().union(*groups)
        if destination and in_flight & set(range(int(destination[1]), int(destination[1]) + width)):
            hits.append(instruction)
    return hits


def test_in_flight_register_checks_find_a_write():
    """The SASS check above flags a write into an in-flight wgmma's A operand, before its wait only."""
    loop = [
        "HGMMA.64x128x16.F32.BF16 R24, R100, gdesc[UR4], R24, gsb0 ;",
        "FADD R101, R1, R2 ;",  # an A operand register (R100..R103)
        "FADD R90, R1, R2 ;",  # not one
        "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
        "FADD R102, R1, R2 ;",  # retired
    ]
    assert writes_to_in_flight_registers(loop[:-1]) == ["FADD R101, R1, R2 ;"] * 2


#: the experimental register-operand form (off by default): one configuration of each ``register_a`` form
REGISTER_A_KERNELS = [
    next(c._replace(persistent=False) for c in gluon_module.REGISTER_A_CONFIGS if c.register_a == form)
    for form in (2, 1)
]


@pytest.mark.parametrize("config", REGISTER_A_KERNELS, ids=lambda c: c.name)
def test_register_operand_configs_compile_for_sm90(config, tmp_path, monkeypatch):
    """The experimental register-operand form: within Hopper's shared memory, the weight as wgmma's A operand from
    registers (``HGMMA.64x256x16.F32.BF16 Rd, Ra, gdesc``: A is a register, B a shared-memory descriptor) for the
    main rows and 64 wide for the tail, Markstein's quotient, and (``SYNC``, the default) each k-step's wgmmas retired
    inside the loop before the next step's conversion can touch their A registers. With whole
    16-blocks a lane (``register_a=2``) the k-loops load the weight with 16-byte shared loads and move no data between
    lanes: no shuffle, no shared-memory store, so the permuted K order costs nothing in the loop."""
    import re

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert config.problem() is None
    kernel = config.compile_for_sm90()
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES, kernel.metadata.shared
    assert "fma.rn.f32" in kernel.asm["ptx"] and "setmaxnreg" in kernel.asm["ptx"]
    sass = gluon_module.sass(kernel.asm["cubin"])
    assert re.search(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, R\d+, gdesc", sass)
    assert re.search(r"HGMMA\.64x64x16\.F32\.BF16 R\d+, R\d+, gdesc", sass)
    loops = k_loops(sass)
    assert loops
    for body in loops:
        text = "\n".join(body)
        assert "WARPGROUP.DEPBAR.LE gsb0, 0x0" in text, text
        assert not writes_to_in_flight_registers(body), writes_to_in_flight_registers(body)[:4]
        if config.register_a == 2:
            assert "LDS.128" in text and not re.search(r"SHFL|STS|LDSM", text), text
        else:
            assert "LDSM" in text and "SHFL.BFLY" in text


def test_wgmma_k_order_gives_each_lane_whole_blocks():
    """``fake_quant_act.wgmma_k_order``: in each 64-chunk, the wgmma A-operand slots of lane ``t`` of a quad (``16 c + 2
    t + {0, 1, 8, 9}`` of each 16-chunk ``c``, PTX's register fragment for ``wgmma .bf16``) hold the whole 16-block
    ``t``, and the permuted activations times the weight permuted alike is the product (float64)."""
    from moeq.runtime.kernels.fake_quant_act import wgmma_k_order

    k_at_slot = wgmma_k_order(torch.arange(128).view(1, 128))[0]
    for chunk in range(2):
        for lane in range(4):
            slots = [64 * chunk + 16 * c + 2 * lane + d for c in range(4) for d in (0, 1, 8, 9)]
            assert sorted(k_at_slot[slots].tolist()) == list(range(64 * chunk + 16 * lane, 64 * chunk + 16 * lane + 16))
    gen = torch.Generator().manual_seed(3)
    x, w = (
        torch.randn(5, 192, generator=gen, dtype=torch.float64),
        torch.randn(192, 7, generator=gen, dtype=torch.float64),
    )
    torch.testing.assert_close(wgmma_k_order(x) @ wgmma_k_order(w.T).T, x @ w)
    with pytest.raises(ValueError, match="K = 96 is not a multiple of 64"):
        wgmma_k_order(torch.zeros(2, 96))


def test_every_shipped_config_is_valid_and_bad_configs_are_named():
    """``GluonConfig.problem`` passes every configuration moeq ships, and names what is wrong with one that cannot
    build (compiling it raises with that text) instead of leaving it to a Gluon layout error."""
    for config in (*gluon_module.CONFIGS, *gluon_module.NVFP4_CONFIGS):
        assert config.problem() is None, config
    good = gluon_module.CONFIGS[0]._replace(swap=False, stacked=True)
    cases = {
        good._replace(swap=True): "swap and stacked are two accumulator arrangements",
        good._replace(swap=True, stacked=False, bn=64): "swap takes 64 weight rows per MMA warpgroup (bn = 128)",
        good._replace(swap=True, stacked=False, bt=128): "bt = 64 (tails of 16, 32 or 64 rows), got bn=128",
        good._replace(mma_warps=6): "mma_warps must be 4 or 8",
        good._replace(bm=192): "bm must be a multiple of 128",
        good._replace(bt=32): "bt of 64",
        good._replace(bn=20, stacked=False): "every wgmma must be 8 to 256 columns wide",
        good._replace(bn=512): "8 to 256 columns wide",
        good._replace(bk=48): "bk must be a multiple of 32",
        good._replace(tail_box=12): "tail_box must divide bt and be a multiple of 8",
        good._replace(tail_box=24): "got 24, bt=64",
    }
    for config, message in cases.items():
        assert message in config.problem(), (config, config.problem())
    with pytest.raises(ValueError, match=r"GluonConfig gluon ws 256\+64x128x48 .*bk must be a multiple of 32"):
        good._replace(bk=48).compile_for_sm90()


def test_unsupported_operands_are_named():
    """On the CPU the kernel is never taken, and its launcher says why; ``grouped_qmm`` keeps the two launches."""
    x_codes = torch.zeros(8, 64, dtype=torch.float8_e4m3fn)
    w = torch.zeros(2, 32, 64, dtype=torch.bfloat16).transpose(1, 2)
    amax = torch.ones(2)
    assert "CUDA" in gluon_module.unsupported_reason(x_codes, w, amax, torch.ones(1))
    offs = torch.tensor([4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="qat_fp8_gluon_gemm: needs a CUDA device"):
        gluon_module.qat_fp8_gluon_gemm(x_codes, w, offs, amax, torch.ones(1))
    assert not launcher.gluon_takes(x_codes, w, amax, torch.ones(1))
    x_fq = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert "CUDA" in gluon_module.unsupported_reason(x_fq, w, amax, None, nvfp4=True)
    with pytest.raises(ValueError, match="qat_nvfp4_gluon_gemm: needs a CUDA device"):
        gluon_module.qat_nvfp4_gluon_gemm(x_fq, w, offs, amax)
    assert not launcher.gluon_takes(x_fq, w, amax, None, nvfp4=True)


def test_fake_output_is_bf16_rows_by_n():
    """The opaque op's fake (what Inductor plans the graph's buffers with): ``[M, N]`` bf16 for ``[E, K, N]`` w."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x_codes = torch.empty(40, 64, dtype=torch.float8_e4m3fn)
        w = torch.empty(3, 24, 64, dtype=torch.bfloat16).transpose(1, 2)
        out = torch.ops.moeq.qat_fp8_gluon_gemm(
            x_codes, w, torch.empty(3, dtype=torch.int32), torch.empty(3), torch.empty(1)
        )
        out_nvfp4 = torch.ops.moeq.qat_nvfp4_gluon_gemm(
            torch.empty(40, 64, dtype=torch.bfloat16), w, torch.empty(3, dtype=torch.int32), torch.empty(3)
        )
    assert out.shape == (40, 24) and out.dtype == torch.bfloat16
    assert out_nvfp4.shape == (40, 24) and out_nvfp4.dtype == torch.bfloat16


def test_register_operand_kernel_waits_for_its_wgmmas_by_default(tmp_path, monkeypatch):
    """The register-operand kernel waits for each step's wgmmas before converting the next (``SYNC``) unless
    ``RS_WGMMA_SYNC`` is turned off. The reason, in this Triton's ptxas: without the wait, the next step's conversion
    writes registers that the previous step's wgmmas, still in flight, read as their A operand (ptxas 12.8, 13.4 and
    13.5 all do; session 38 saw wrong tail rows on the H100 from it)."""
    assert gluon_module.RS_WGMMA_SYNC is True
    assert gluon_module.REGISTER_A_CONFIGS[0].constexprs(128)["SYNC"] is True
    monkeypatch.setattr(gluon_module, "RS_WGMMA_SYNC", False)
    assert gluon_module.REGISTER_A_CONFIGS[0].constexprs(128)["SYNC"] is False
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    sass = gluon_module.sass(
        gluon_module.REGISTER_A_CONFIGS[0]._replace(persistent=False).compile_for_sm90().asm["cubin"]
    )
    assert any(writes_to_in_flight_registers(loop) for loop in k_loops(sass)), (
        "this ptxas keeps in-flight wgmma A registers intact without the wait: RS_WGMMA_SYNC could be revisited"
    )
