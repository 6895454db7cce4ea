"""The registered torch.library ops of fusedvq: a forward and a backward op per fused computation, and one
autograd definition between them (definition.py), which eager calls share (calls.py).

    loss.py    fusedvq::masked_mse_forward / _backward     the loss, norm "none" / "stats"
               fusedvq::batch_mse_forward / _backward      the loss, norm "batch"
    clean.py   fusedvq::clean_forward / _backward          clean_features, norm "none" / "stats"
               fusedvq::batch_clean_forward / _backward    clean_features, norm "batch"

Every op takes use_triton: the implementation is chosen by the caller's backend ("auto": Triton for CUDA
tensors) rather than by the tensors' device alone, because both other pairings are real uses: the
reference path on CUDA (to compare against, or where Triton is missing) and the Triton kernels on CPU
tensors under TRITON_INTERPRET=1 (how the kernels are tested without a GPU). The ops contain no host
synchronization and have fake implementations, so torch.compile traces them and CUDA graphs capture them.
Arguments are validated by the callers (functional.py, module.py, clean.py) before they reach these ops.
"""

from .clean import BATCH_CLEAN, CLEAN
from .loss import BATCH_MSE, MASKED_MSE

__all__ = ["MASKED_MSE", "BATCH_MSE", "CLEAN", "BATCH_CLEAN"]
