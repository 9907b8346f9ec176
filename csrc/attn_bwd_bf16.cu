// Backward kernels for __nv_bfloat16 (every head dim of FASTATTN_HEAD_DIMS); one dtype per file so the build compiles in parallel.
#include "attn_bwd.cuh"

namespace fastattn {
cudaError_t run_bwd_bf16(const BwdParams& p) { return dispatch_bwd<__nv_bfloat16>(p); }
}  // namespace fastattn
