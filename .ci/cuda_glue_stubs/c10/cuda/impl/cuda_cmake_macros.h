// Stand-in for the header PyTorch generates in its CUDA builds, which the CPU wheel lacks.
// Used only by .ci/check_cuda to syntax-check csrc/ops_cuda.cpp against CPU-only torch.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
