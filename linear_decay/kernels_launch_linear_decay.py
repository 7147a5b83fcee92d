"""A cheaper launch path for the model's Triton kernels (on by default with Triton 3.6; LINEAR_DECAY_FAST_LAUNCH=0: off).

Eager training steps of the 410m models are host-bound on an H200 (benchmarks/host_overhead.py), and each
layer launches about 18 Triton kernels per forward + backward. `JITFunction[grid](*args)` re-derives the kernel's
specialisation on every call (argument binding, the cache-key string, global-value checks, launch metadata): 24.7 µs
per launch there, against 9.9 µs for the same kernel through its compiled launcher.

`fast_launch(kernel)` wraps a `@triton.jit` kernel so that `kernel[grid](*args, **kwargs)` keeps the compiled kernel
of each specialisation itself and calls its launcher directly. The key holds everything Triton specialises an argument
on — a tensor's dtype and 16-byte alignment; an integer's value 1, divisibility by 16 and width (i32 / i64 / u64);
bool, float, None; constexpr values — plus the launch options and the current device (`specialisation_key`,
checked against Triton's own `native_specialize_impl` in tests/test_kernels_launch.py). A key's first call goes
through Triton (compiling or loading, and launching); later calls launch directly on the current stream. Triton's
path is kept for everything else: the interpreter, a callable grid, launch hooks (profilers), Triton versions other
than 3.6 (the launcher's calling convention is Triton's private API), and LINEAR_DECAY_FAST_LAUNCH=0.

Measured on an H200 (benchmarks/host_overhead.py): the GPU kernel tests pass with it; a launch of the
norm kernel costs 22.0 µs of host time against 25.9 µs through `JITFunction[grid]` (13.0 µs through the compiled
kernel's own launcher), and one 410m block forward + backward with the backward on the calling thread 4,993 against
5,438 µs (mamba2), 3,776 against 4,174 (gla), 4,318 against 4,697 (simple).
"""

import os

try:
    import triton
except ImportError as error:  # CPU-only torch ships without Triton: the PyTorch path is used instead
    raise ImportError("Triton is not installed") from error

import torch

FAST_LAUNCH = os.environ.get("LINEAR_DECAY_FAST_LAUNCH", "1") != "0"
_VERIFIED_TRITON = triton.__version__.split(".")[:2] == ["3", "6"]


def specialisation_key(value, constexpr):
    """What Triton 3.6 specialises one kernel argument on (a superset: equal keys mean equal specialisations)."""
    if constexpr:
        return value
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if value is None:
        return None
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int, value == 1, value % 16 == 0, -2**31 <= value < 2**31, value >= 2**63
    if isinstance(value, float):
        return float
    return value


class FastLaunch:
    """A `@triton.jit` kernel whose launches skip Triton's per-call specialisation (module docstring); every other
    attribute is the kernel's."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}  # specialisation key -> (launcher, function handle, packed metadata)
        # a JITFunction (not the interpreter's InterpretedFunction, TRITON_INTERPRET=1) of a verified Triton
        self.direct = isinstance(kernel, triton.runtime.jit.JITFunction) and _VERIFIED_TRITON
        if self.direct:
            params = kernel.params
            self.names = [p.name for p in params]
            self.name_set = set(self.names)
            self.constexprs = [p.is_constexpr for p in params]
            self.defaults = {p.name: p.default for p in params if p.has_default}

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        if not (FAST_LAUNCH and self.direct) or callable(grid):
            return self.kernel[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        runtime = triton.knobs.runtime
        if runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls:
            return self.kernel[grid](*args, **kwargs)
        values = [*args, *[kwargs[name] if name in kwargs else self.defaults[name] for name in self.names[len(args):]]]
        device = torch.cuda.current_device()
        key = [device]
        for name, value in kwargs.items():  # launch options (num_warps, ...)
            if name not in self.name_set:
                key += (name, value)
        for value, constexpr in zip(values, self.constexprs):
            if constexpr:
                key.append(value)
            elif type(value) is torch.Tensor:  # specialisation_key's tensor case, inlined: most arguments are tensors
                key += (value.dtype, value.data_ptr() % 16 == 0)
            else:
                key.append(specialisation_key(value, False))
        key = tuple(key)
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)  # Triton compiles or loads, and launches
            if compiled is not None and not hasattr(compiled, "result"):  # (not an asynchronous compile's future)
                self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return compiled
        launcher, function, metadata = entry
        launcher(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 torch._C._cuda_getCurrentRawStream(device), function, metadata, None, None, None, *values)


def fast_launch(kernel):
    """Wrap a `@triton.jit` kernel for `FastLaunch` (a decorator placed above `@triton.jit`)."""
    return FastLaunch(kernel)


__all__ = ["FAST_LAUNCH", "FastLaunch", "fast_launch", "specialisation_key"]
