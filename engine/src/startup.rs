//! Process-wide settings for the CPU and GPU backends, made once at start-up.

/// Process-wide settings for the CPU backend; call once at start-up, before any thread starts.
///
/// - The C allocator keeps freed memory for reuse (glibc on Linux; elsewhere a no-op): with glibc's
///   defaults, blocks above the adaptive mmap threshold are mapped and unmapped on every allocation
///   and the heap top is trimmed, so what the storage pool (`engine::pool`) does not hold (GEMM
///   packing buffers, the first steps' tensors) would page-fault back in every time.
/// - The calling thread becomes one of the CPU pool's workers (rayon's global pool, one thread per
///   core it may run on): a parallel region it starts then pushes its tasks onto its own deque and
///   works on them while the other workers steal. Without this, each region was sent to the pool
///   from outside and the caller slept until it ended, a wake-up and a sleep per region (~20,000
///   context switches in a 51-step two-core SASRec bench, now ~2,000; the two-core step ~3%
///   faster, benches/RESULTS.md). Only the main thread should call this.
/// - `XDG_RUNTIME_DIR` is set to a private directory when it is unset or invalid, so that probing
///   GPU adapters prints nothing from the Vulkan loader's window-system layers.
pub fn startup() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before other threads allocate.
    unsafe {
        // 32 MiB is glibc's largest mmap threshold on 64-bit; trimming only above 1 GiB of free top.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    // The Vulkan loader's window-system layers print "XDG_RUNTIME_DIR is invalid or not set" (four
    // lines, read as this tool's errors) when probing adapters without one, e.g. over ssh or in a
    // container: give them a private directory. Only when the variable is unset or not a directory.
    #[cfg(unix)]
    if !std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from).is_some_and(|p| p.is_dir()) {
        use std::os::unix::fs::DirBuilderExt;
        // SAFETY: getuid has no preconditions.
        let dir = std::env::temp_dir().join(format!("msm4sr-runtime-{}", unsafe { libc::getuid() }));
        if std::fs::DirBuilder::new().mode(0o700).create(&dir).is_ok() || dir.is_dir() {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
    // Last: the pool's threads start here, after the allocator settings and the environment.
    // It fails only when the global pool already exists (something used it before start-up): it then
    // works as before, with the caller outside it.
    let _ = rayon::ThreadPoolBuilder::new().use_current_thread().build_global();
}
