"""The direct launch path (`kernels_launch_linear_decay`, off with LINEAR_DECAY_FAST_LAUNCH=0): its specialisation key
against Triton's own argument specialisation, and when a launch goes through Triton or straight to the kept launcher
(a JITFunction whose Triton side is replaced by a recorder: CPU tests cannot launch on a GPU)."""

import pytest
import torch

triton = pytest.importorskip("triton")

import linear_decay.kernels_launch_linear_decay as launch  # noqa: E402


def _values():
    tensors = [torch.ones(8, dtype=dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32)]
    misaligned = [t[1:] for t in tensors]  # 4 or 2 bytes past a 16-byte boundary
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**63 - 1, 2**63]
    return [*tensors, *misaligned, *ints, True, False, 0.0, 1.0, 0.5, 1e30, None]


def test_key_separates_everything_triton_specialises_on():
    """Equal keys imply equal specialisations by Triton's native_specialize_impl (so a kept launcher is never used for
    arguments Triton would have compiled differently)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    values = _values()
    triton_spec = [native_specialize_impl(BaseBackend, value, False, True, True) for value in values]
    ours = [launch.specialisation_key(value, False) for value in values]
    for i in range(len(values)):
        for j in range(len(values)):
            if ours[i] == ours[j]:
                assert triton_spec[i] == triton_spec[j], (values[i], values[j])
    assert len(set(map(repr, triton_spec))) > 10  # the values do exercise different specialisations


def recorded_kernel(a_ptr, n, scale, BLOCK, FLAG=True):  # a kernel's signature; never compiled here
    pass


recorded_kernel.__annotations__ = {"BLOCK": "tl.constexpr", "FLAG": "tl.constexpr"}


class Recorder:
    """Triton's side of a launch: the JIT path (compiles and returns a kept kernel) and the kept launcher."""

    def __init__(self):
        self.jit_calls, self.direct_calls = [], []

    def run(self, *args, grid, warmup, **kwargs):
        self.jit_calls.append((grid, args, kwargs))
        recorder = self

        class Compiled:
            function, packed_metadata = "function", "metadata"

            @staticmethod
            def run(*launch_args):
                recorder.direct_calls.append(launch_args)
        return Compiled()


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    monkeypatch.setattr(launch, "_VERIFIED_TRITON", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    jit = triton.runtime.jit.JITFunction(recorded_kernel)
    recorder = Recorder()
    monkeypatch.setattr(jit, "run", recorder.run)
    return launch.fast_launch(jit), recorder


def test_a_kept_kernel_is_launched_directly(fast):
    kernel, recorder = fast
    x = torch.ones(8)
    kernel[(3,)](x, 40, 0.5, 64, num_warps=4)  # the first of its specialisation: through Triton
    assert len(recorder.jit_calls) == 1 and not recorder.direct_calls
    kernel[(5, 2)](x, 24, 0.25, BLOCK=64, num_warps=4)  # the same specialisation (24, 40: i32, not 1, 16 ∤ n)
    assert len(recorder.jit_calls) == 1 and len(recorder.direct_calls) == 1
    grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit_, *values = (
        recorder.direct_calls[0])
    assert (grid_x, grid_y, grid_z, stream, function, metadata) == (5, 2, 1, 77, "function", "metadata")
    assert (launch_metadata, enter, exit_) == (None, None, None)
    assert values[0] is x and values[1:] == [24, 0.25, 64, True]  # every argument in order, defaults included


@pytest.mark.parametrize("change", ["alignment", "one", "divisible", "dtype", "none", "constexpr", "warps"])
def test_another_specialisation_goes_through_triton(fast, change):
    kernel, recorder = fast
    x = torch.ones(8)
    base = dict(a_ptr=x, n=40, scale=0.5, BLOCK=64, num_warps=4)
    kernel[(1,)](**base)
    kernel[(1,)](**base)
    assert (len(recorder.jit_calls), len(recorder.direct_calls)) == (1, 1)
    other = {"alignment": dict(a_ptr=x[1:]), "one": dict(n=1), "divisible": dict(n=48), "dtype": dict(a_ptr=x.half()),
             "none": dict(a_ptr=None), "constexpr": dict(BLOCK=128), "warps": dict(num_warps=8)}[change]
    kernel[(1,)](**{**base, **other})
    assert (len(recorder.jit_calls), len(recorder.direct_calls)) == (2, 1)


def test_triton_path_when_off_or_hooked(fast, monkeypatch):
    kernel, recorder = fast
    x = torch.ones(8)
    for _ in range(2):
        kernel[(1,)](x, 40, 0.5, 64)
    hook = lambda metadata: None  # noqa: E731  (a profiler's launch hook)
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        kernel[(1,)](x, 40, 0.5, 64)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    kernel[(1,)](x, 40, 0.5, 64)
    assert (len(recorder.jit_calls), len(recorder.direct_calls)) == (3, 1)
    assert kernel.arg_names == ["a_ptr", "n", "scale", "BLOCK", "FLAG"]  # the kernel's own attributes
