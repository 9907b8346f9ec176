// Forward kernels for __half (head dims 64 and 128); one dtype per file so the build compiles in parallel.
#include "attn_fwd.cuh"

namespace fastattn {
cudaError_t run_fwd_fp16(const FwdParams& p) { return dispatch_fwd<__half>(p); }
}  // namespace fastattn
