"""Does KernelLauncher's direct launch pass the launcher exactly what Triton's own launch passes?

Run by tests/test_launch.py in a fresh process without TRITON_INTERPRET and without a GPU: a stand-in
driver lets Triton compile the real kernels for sm_90 and records each launch instead of running it. For
each case the same arguments are launched twice through KernelLauncher: the first launch goes through
JITFunction.run, the second through the cached compiled kernel. Both recorded argument lists must be
identical (launch metadata and hooks aside: there are none), and the cached kernel must be the one
JITFunction.run picks for those arguments. Prints one JSON line per case.
"""

import json

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

launches = []


class _Launcher:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        launches.append(args)


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 32, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class _Driver:
    launcher_cls = _Launcher
    utils = _Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it is on cuda:0, so that the launcher takes its CUDA path."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


def main():
    driver.set_active(_Driver())
    from fusedvq.kernels import launchers, masked_mse, plan

    plan.current_stream_handle = lambda index: 1234  # what the stand-in driver's stream is
    x = torch.randn(64, 187)
    r = torch.randn(64, 171)
    idx = torch.randperm(187)[:171]
    shift, scale = torch.randn(171), torch.rand(171) + 0.5
    out, partial, counter = torch.empty(()), torch.empty(8), torch.zeros(1, dtype=torch.int32)
    shifted = torch.randn(64 * 187 + 1)[1:].view(64, 187)  # data pointer 4 bytes past 16-byte alignment
    cases = {
        "mean": (x, 64, 1.0 / (64 * 171), 1),
        "sum, B = 1": (x[:1], 1, 1.0, 2),
        "misaligned x": (shifted, 64, 1.0 / (64 * 171), 1),
        "B = 48": (x[:48], 48, 1.0 / (48 * 171), 1),
    }
    fwd = launchers._FWD
    kernels = []  # distinct compiled kernels, in order of first use
    for name, (xc, B, out_scale, reduction) in cases.items():
        xc = xc.as_subclass(_OnDevice)
        args = (xc, r, r, idx, shift, shift, scale, xc, out, partial, partial, partial, partial, counter, B, 171,
                187, xc.stride(0), xc.stride(1), r.stride(0), r.stride(1), 0, 0, 0, 0, out_scale)
        constexprs = dict(NORM=1, NAN_TO_NUM=0, REDUCTION=reduction, WEIGHTED=0, COLSUMS=0, CLEAN=0, EMBED=0,
                          BLOCK_B=8, BLOCK_K=256, BLOCK_P=1024)
        cached_before = len(fwd.compiled)
        launches.clear()
        fwd.launch((8,), args, num_warps=8, **constexprs)  # through JITFunction.run
        fwd.launch((8,), args, num_warps=8, **constexprs)  # direct
        through_triton, direct = launches
        picked = masked_mse._masked_mse_fwd_kernel[(8,)](*args, num_warps=8, **constexprs)
        key = next((k for k, v in fwd.compiled.items() if v is picked), None)
        if not any(k is picked for k in kernels):
            kernels.append(picked)
        same = len(through_triton) == len(direct) and all(
            (a is b) or (not isinstance(a, torch.Tensor) and a == b)
            for i, (a, b) in enumerate(zip(through_triton, direct)) if i not in (6, 7, 8)  # metadata, hooks
        )
        print(json.dumps({"case": name, "same_arguments": same, "hooks": [direct[7], direct[8]],
                          "cached": len(fwd.compiled) - cached_before, "cached_is_tritons_choice": key is not None,
                          "kernel": next(i for i, k in enumerate(kernels) if k is picked),
                          "arguments": len(direct)}))


if __name__ == "__main__":
    main()
