/* Parallel regions: OpenMP, resolved at load time to the libgomp torch already loaded (same
 * soname), so the native kernels and torch share ONE pool of worker threads. A separate pool
 * measured 2x slower decode right after a torch prefill: torch's workers spin-wait for a few
 * ms after each parallel op and took the core from ours. After a fork() the child runs
 * serially (libgomp's pool does not survive fork; results do not depend on the thread count). */
#include "mt.h"

#include <omp.h>
#include <unistd.h>

static pid_t pool_pid = 0;

void parallel_run(task_fn fn, void *ctx, int nth) {
    if (nth > 1) {
        pid_t me = getpid();
        if (pool_pid == 0) pool_pid = me;
        if (pool_pid != me) nth = 1;
    }
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
#pragma omp parallel num_threads(nth)
    fn(ctx, omp_get_thread_num(), omp_get_num_threads());
}
