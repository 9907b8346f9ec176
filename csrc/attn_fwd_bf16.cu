// Forward kernels for __nv_bfloat16 (every head dim of FASTATTN_HEAD_DIMS); one dtype per file so the build compiles in parallel.
#include "attn_fwd.cuh"

namespace fastattn {
cudaError_t run_fwd_bf16(const FwdParams& p) { return dispatch_fwd<__nv_bfloat16>(p); }
}  // namespace fastattn
