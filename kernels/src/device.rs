//! The device side: finding a usable GPU, compiling the CUDA sources once per process
//! with NVRTC, uploading a site's batch and launching the kernels.
//!
//! A site is at most two launches: the LoRA projections x·Aᵀ and δ·B when the caller
//! has none (`project_pair`, both in one grid), then one site kernel (`sq_site_*`) for
//! both factors, which reads the sample lengths from the mask itself and sums its
//! partials in the blocks that finish last (cuda/site.cu). The grid is planned from the
//! kernel's occupancy so that it runs in one wave.
//!
//! Every driver call's result is checked and turned into a [`KernelError`]; launches
//! report configuration errors at once and faults at the next synchronisation, which
//! every read-back does before it returns.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, cudaError_enum};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::shape::{DenseInputs, DenseShape, DenseSquares, LoraInputs, LoraShape, LoraSquares};
use crate::{KernelError, Mode, ShapeError};

/// The CUDA C sources, compiled together as one program. `common.cuh` goes first: NVRTC
/// gets no include path, so the shared helpers are prepended rather than `#include`d;
/// `site.cu` last, as it instantiates the tiles of the two files before it.
const SOURCES: [&str; 5] = [
    include_str!("../cuda/common.cuh"),
    include_str!("../cuda/project.cu"),
    include_str!("../cuda/sq_gemm.cu"),
    include_str!("../cuda/sq_gemm_tf32.cu"),
    include_str!("../cuda/site.cu"),
];

/// Every kernel the host launches; the NVRTC test checks that each binary defines them all.
pub const KERNEL_NAMES: [&str; 6] = [
    "project_pair",
    "fill_f32",
    "sq_site_f32_m8",
    "sq_site_f32_m16",
    "sq_site_f32_m64",
    "sq_site_tf32",
];

/// Compiled binaries per target (`sm_90`, `compute_90`, …): NVRTC takes a second or
/// more, so each process compiles once per target and every [`GpuFisher`] (one per
/// context) loads the cached bytes.
static BINARY_CACHE: Mutex<Vec<(String, Compiled)>> = Mutex::new(Vec::new());

/// What NVRTC made of the sources for one target.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The PTX text (for a `compute_XY` target) or the CUBIN (for `sm_XY`).
    pub bytes: Vec<u8>,
    /// NVRTC's log; for an `sm_XY` target it holds ptxas's resource report (registers,
    /// shared memory, spills) per kernel.
    pub log: String,
}

/// Runs a closure that calls into cudarc, turning a panic (cudarc panics on a missing
/// library or symbol) into an error the caller can fall back on.
fn guarded<T>(
    during: &'static str,
    f: impl FnOnce() -> Result<T, KernelError>,
) -> Result<T, KernelError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(KernelError::Panicked { during, message })
    })
}

/// True when the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda under its usual names and drops the handle;
    // no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: as for `driver_present`, for libnvrtc.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version as "13.0", or why it is unknown.
pub fn nvrtc_version() -> String {
    if !nvrtc_present() {
        return "absent".to_owned();
    }
    let (mut major, mut minor) = (0, 0);
    let r = guarded("reading the NVRTC version", || {
        // SAFETY: nvrtcVersion writes two ints through the pointers, which are valid.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&raw mut major, &raw mut minor) };
        Ok(status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS)
    });
    match r {
        Ok(true) => format!("{major}.{minor}"),
        Ok(false) => "unknown (nvrtcVersion failed)".to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// The CUDA version the driver supports, as "13.0", or why it is unknown.
pub fn driver_version() -> String {
    if !driver_present() {
        return "absent".to_owned();
    }
    let mut v = 0;
    let r = guarded("reading the driver version", || {
        // SAFETY: cuDriverGetVersion writes one int through the pointer, which is valid;
        // it needs no cuInit.
        let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&raw mut v) };
        Ok(status == cudaError_enum::CUDA_SUCCESS)
    });
    match r {
        Ok(true) => format!("{}.{}", v / 1000, (v % 1000) / 10),
        Ok(false) => "unknown (cuDriverGetVersion failed)".to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// The kernels compiled by NVRTC for `target`: a virtual architecture such as
/// `compute_90` gives PTX, a real one such as `sm_90` a CUBIN (with ptxas's resource
/// report in the log). Cached for the process. Needs NVRTC but no GPU and no driver, so
/// it also checks the sources on machines without a GPU.
pub fn compile(target: &str) -> Result<Compiled, KernelError> {
    {
        let cache = BINARY_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, c)) = cache.iter().find(|(t, _)| t == target) {
            return Ok(c.clone());
        }
    }
    if !nvrtc_present() {
        return Err(KernelError::NoNvrtc);
    }
    let cubin = target.starts_with("sm_");
    let compiled = guarded("compiling with NVRTC", || nvrtc_compile(target, cubin))?;
    let mut cache = BINARY_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    cache.push((target.to_owned(), compiled.clone()));
    Ok(compiled)
}

/// The PTX text for a virtual architecture such as `compute_90` (see [`compile`]).
pub fn compile_ptx(arch: &str) -> Result<String, KernelError> {
    let c = compile(arch)?;
    Ok(String::from_utf8_lossy(&c.bytes)
        .trim_end_matches('\0')
        .to_owned())
}

/// An NVRTC program, destroyed however `nvrtc_compile` ends (a panic of cudarc's on a
/// symbol an old NVRTC lacks included).
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: made by create_program in `nvrtc_compile`, destroyed only here.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

fn nvrtc_compile(target: &str, cubin: bool) -> Result<Compiled, KernelError> {
    use cudarc::nvrtc::{result, sys};
    let fail = |log: String| KernelError::Compile {
        arch: target.to_owned(),
        log,
    };
    let source = std::ffi::CString::new(SOURCES.concat())
        .map_err(|_| fail("a NUL byte in the sources".to_owned()))?;
    let name = c"fibecfed_squares.cu";
    let prog = result::create_program(&source, Some(name)).map_err(|e| fail(e.to_string()))?;
    let program = Program(prog);
    let mut options = vec![format!("--gpu-architecture={target}"), "--std=c++17".into()];
    if cubin {
        // ptxas's report (registers, shared memory, spills per kernel) into the log.
        options.push("--ptxas-options=-v".into());
    }
    // SAFETY: `program.0` is a live program (destroyed by the guard, after this block);
    // every buffer handed to NVRTC is sized by the matching *Size call.
    unsafe {
        let prog = program.0;
        let compiled = result::compile_program(prog, &options);
        let log = result::get_program_log(prog)
            .map(|raw| {
                let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
                std::ffi::CStr::from_bytes_until_nul(&bytes).map_or_else(
                    |_| String::from_utf8_lossy(&bytes).into_owned(),
                    |c| c.to_string_lossy().into_owned(),
                )
            })
            .unwrap_or_default();
        let bytes = match compiled {
            Err(e) => Err(fail(format!("{e}: {log}"))),
            Ok(()) if cubin => {
                let mut size = 0usize;
                let mut bytes = Vec::new();
                if sys::nvrtcGetCUBINSize(prog, &raw mut size) == sys::nvrtcResult::NVRTC_SUCCESS {
                    bytes = vec![0u8; size];
                    if sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast())
                        != sys::nvrtcResult::NVRTC_SUCCESS
                    {
                        bytes.clear();
                    }
                }
                if bytes.is_empty() {
                    Err(fail("NVRTC compiled but gave no CUBIN".to_owned()))
                } else {
                    Ok(bytes)
                }
            }
            Ok(()) => result::get_ptx(prog)
                .map(|raw| raw.iter().map(|&c| c as u8).collect())
                .map_err(|e| fail(e.to_string())),
        };
        bytes.map(|bytes| Compiled { bytes, log })
    }
}

/// How per-sample products are formed on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tile {
    /// fp32, a tile 8 rows tall: LoRA factors of rank ≤ 8.
    M8,
    /// fp32, 16 rows: ranks 9..=16.
    M16,
    /// fp32, 64 × 64: dense layers and larger ranks.
    M64,
    /// tf32 tensor cores, 64 × 64.
    Tf32,
}

impl Tile {
    fn pick(m: usize, mode: Mode) -> Self {
        match mode {
            Mode::Tf32 => Self::Tf32,
            Mode::Fp32 if m <= 8 => Self::M8,
            Mode::Fp32 if m <= 16 => Self::M16,
            Mode::Fp32 => Self::M64,
        }
    }

    /// (rows of C, columns of C, threads) per block, as in the .cu sources.
    fn dims(self) -> (usize, usize, u32) {
        match self {
            Self::M8 => (8, 128, 256),
            Self::M16 => (16, 128, 256),
            Self::M64 => (64, 64, 256),
            Self::Tf32 => (64, 64, 128),
        }
    }

    fn index(self) -> usize {
        match self {
            Self::M8 => 0,
            Self::M16 => 1,
            Self::M64 => 2,
            Self::Tf32 => 3,
        }
    }
}

/// The launch geometry of one product C_n = G_nᵀ·X_n (M × K) within a site launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    tiles_m: usize,
    tiles_k: usize,
    /// Sample groups: the batch split evenly (sizes differ by at most one).
    groups: usize,
}

impl Plan {
    fn tiles(&self) -> usize {
        self.tiles_m * self.tiles_k
    }

    fn blocks(&self) -> usize {
        self.tiles() * self.groups
    }
}

/// The most blocks one launch may have (gridDim.x of a 1-D grid, and the kernels'
/// 32-bit block index).
const MAX_BLOCKS: usize = i32::MAX as usize;

/// The plans of a site's products (one or two, all with the same tile kind): groups
/// chosen so that the grid fits the blocks the device holds at once (`resident`, from
/// the kernel's occupancy), in one wave; `max_groups` caps them (tests use it to put
/// several samples in each block).
fn plan_site(
    tile: Tile,
    batch: usize,
    products: &[(usize, usize)],
    resident: usize,
    max_groups: Option<usize>,
) -> Result<Vec<Plan>, KernelError> {
    let (bm, bk, _) = tile.dims();
    let mut plans = Vec::with_capacity(products.len());
    let mut tiles_total = 0usize;
    for &(m, k) in products {
        let (tiles_m, tiles_k) = (m.div_ceil(bm), k.div_ceil(bk));
        let tiles = tiles_m
            .checked_mul(tiles_k)
            .filter(|&t| t <= MAX_BLOCKS)
            .ok_or(KernelError::Shape(ShapeError::Grid {
                rows: m,
                cols: k,
                tile_rows: bm,
                tile_cols: bk,
                tiles: tiles_m.saturating_mul(tiles_k),
                limit: MAX_BLOCKS,
            }))?;
        tiles_total += tiles;
        plans.push(Plan {
            tiles_m,
            tiles_k,
            groups: 1,
        });
    }
    // Every product's per-sample cost is about proportional to its tile count (same
    // tile kind), so one group count for all splits the resident blocks by work. A site
    // with more tiles than resident blocks runs in several waves of one group each.
    let mut groups = (resident / tiles_total.max(1)).clamp(1, batch.max(1));
    if let Some(cap) = max_groups {
        groups = groups.min(cap.max(1));
    }
    // Fewer groups until the grid fits one launch.
    while groups > 1 && tiles_total.saturating_mul(groups) > MAX_BLOCKS {
        groups /= 2;
    }
    if tiles_total > MAX_BLOCKS {
        let (m, k) = products[0];
        return Err(KernelError::Shape(ShapeError::Grid {
            rows: m,
            cols: k,
            tile_rows: bm,
            tile_cols: bk,
            tiles: tiles_total,
            limit: MAX_BLOCKS,
        }));
    }
    for p in &mut plans {
        p.groups = groups;
    }
    Ok(plans)
}

/// One product of a site launch as the kernel reads it (`struct Product` in
/// cuda/common.cuh): pointers first, then 32-bit fields, 88 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ProductArgs {
    g: u64,
    x: u64,
    s_part: u64,
    f_part: u64,
    s_out: u64,
    f_out: u64,
    tile_done: u64,
    m: i32,
    k: i32,
    gscale: f32,
    transpose: i32,
    tiles_m: i32,
    tiles_k: i32,
    groups: i32,
}

/// A site launch's parameters (`struct Site` in cuda/common.cuh), 216 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SiteArgs {
    p: [ProductArgs; 2],
    mask: u64,
    all_done: u64,
    nprod: i32,
    batch: i32,
    seq_len: i32,
    blocks0: i32,
    blocks: i32,
}

// The CUDA side asserts the same sizes (static_assert in common.cuh).
const _: () = assert!(std::mem::size_of::<ProductArgs>() == 88);
const _: () = assert!(std::mem::size_of::<SiteArgs>() == 216);

// SAFETY: plain #[repr(C)] data (integers, floats, device addresses) laid out exactly as
// the kernels' `struct Site`, checked by the size assertions on both sides.
unsafe impl DeviceRepr for SiteArgs {}

/// One product to launch: G (rows × m) weighted by m_t²·gscale, X (rows × k); `transpose`
/// writes the diagonal k × m.
struct Product<'a> {
    g: &'a CudaSlice<f32>,
    m: usize,
    x: &'a CudaSlice<f32>,
    k: usize,
    gscale: f32,
    transpose: bool,
}

/// Device scratch of one product: per-(sample, tile) and per-group partial sums, and the
/// per-tile counters of finished groups (zero between launches: the last block resets
/// them).
struct Scratch {
    s_part: CudaSlice<f32>,
    f_part: CudaSlice<f32>,
    tile_done: CudaSlice<u32>,
}

/// Where a product's results go.
struct Outputs<'a> {
    scratch: &'a mut Scratch,
    s_out: &'a mut CudaSlice<f32>,
    f_out: &'a mut CudaSlice<f32>,
}

/// The loaded module's kernels.
struct Kernels {
    project_pair: CudaFunction,
    fill: CudaFunction,
    /// Indexed by [`Tile::index`].
    site: [CudaFunction; 4],
}

/// How the kernels came to be on the device, for logs and the bench's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// NVRTC's version, e.g. "13.0".
    pub nvrtc: String,
    /// The CUDA version the driver supports, e.g. "13.0".
    pub driver: String,
    /// "CUBIN sm_90", or "PTX compute_90 (CUBIN: <why not>)".
    pub binary: String,
    /// Resident blocks per multiprocessor of each site kernel (m8, m16, m64, tf32), from
    /// the driver's occupancy calculator.
    pub occupancy: [usize; 4],
}

/// A GPU with the kernels loaded: the entry point of the GPU path.
///
/// All work goes to one stream (the context's default stream), in order, so no
/// cross-stream synchronisation is needed anywhere.
pub struct GpuFisher {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    name: String,
    capability: (i32, i32),
    sms: usize,
    l2_bytes: usize,
    build: BuildInfo,
    flush: Mutex<Option<CudaSlice<u8>>>,
    reuse: Mutex<Reuse>,
    /// Set once reading an event time has failed by a panic (a driver without
    /// `cuEventElapsedTime_v2`): later timings use the host clock without trying again.
    no_event_timing: AtomicBool,
}

/// What [`GpuFisher::lora_site`] keeps between calls, so that a Fisher pass (the same
/// few site shapes over and over) neither allocates device memory nor copies from
/// pageable host memory at every site: the jobs of the shapes seen last, and one pinned
/// host buffer the inputs are staged through (pageable copies go through the driver's
/// own bounce buffer and are synchronous; pinned ones are DMA at full link speed).
#[derive(Default)]
struct Reuse {
    pinned: Option<PinnedHostSlice<f32>>,
    jobs: Vec<LoraJob>,
}

/// Jobs kept by [`Reuse`]: a site's shapes differ by the batch (the last one is short)
/// and by the projection's widths, so a handful covers a pass.
const REUSED_JOBS: usize = 8;

impl fmt::Debug for GpuFisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuFisher")
            .field("device", &self.name)
            .field("ordinal", &self.ctx.ordinal())
            .field("capability", &self.capability)
            .field("multiprocessors", &self.sms)
            .field("build", &self.build)
            .finish_non_exhaustive()
    }
}

fn is_no_device(e: DriverError) -> bool {
    e.0 == cudaError_enum::CUDA_ERROR_NO_DEVICE
}

/// The device address of a buffer, for the kernels' parameter block. Event tracking is
/// off (one stream, see `load`), so the guard cudarc returns records nothing and may be
/// dropped before the launch; with tracking on, the guards would have to outlive it.
fn addr<T>(buf: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (ptr, _guard) = buf.device_ptr(stream);
    ptr
}

impl GpuFisher {
    /// The first GPU. Fails with a typed reason (no driver, no NVRTC, no device, the
    /// sources do not compile, …) and never panics, so that callers can fall back.
    pub fn new() -> Result<Self, KernelError> {
        Self::with_ordinal(0)
    }

    /// GPU number `ordinal` as the driver counts them.
    pub fn with_ordinal(ordinal: usize) -> Result<Self, KernelError> {
        // cudarc panics when a library is missing: check both before any call.
        if !driver_present() {
            return Err(KernelError::NoDriver);
        }
        if !nvrtc_present() {
            return Err(KernelError::NoNvrtc);
        }
        let ctx = guarded("opening the device", || {
            let count = CudaContext::device_count().map_err(|e| {
                if is_no_device(e) {
                    KernelError::NoDevice {
                        ordinal,
                        count: 0,
                        driver: Some(e.to_string()),
                    }
                } else {
                    KernelError::driver("counting devices")(e)
                }
            })?;
            let count = usize::try_from(count).unwrap_or(0);
            if ordinal >= count {
                return Err(KernelError::NoDevice {
                    ordinal,
                    count,
                    driver: None,
                });
            }
            CudaContext::new(ordinal).map_err(KernelError::driver("creating a context"))
        })?;
        guarded("loading the kernels", || Self::load(ctx))
    }

    /// The module: the CUBIN NVRTC builds for the device's own `sm_XY` (no JIT, and no
    /// PTX version the driver may be too old for), else the PTX for `compute_XY`, which
    /// the driver JIT-compiles (an NVRTC too old to know the architecture, say).
    fn load_module(
        ctx: &Arc<CudaContext>,
        capability: (i32, i32),
    ) -> Result<(Arc<cudarc::driver::CudaModule>, String), KernelError> {
        let (major, minor) = capability;
        let sm = format!("sm_{major}{minor}");
        let cubin_failure = match compile(&sm) {
            Ok(c) => match ctx.load_module(Ptx::from_binary(c.bytes)) {
                Ok(module) => return Ok((module, format!("CUBIN {sm}"))),
                Err(e) => format!("the driver refused it: {e}"),
            },
            Err(e) => e.to_string(),
        };
        let arch = format!("compute_{major}{minor}");
        let ptx_failure = match compile_ptx(&arch) {
            Ok(ptx) => match ctx.load_module(Ptx::from_src(ptx)) {
                Ok(module) => {
                    return Ok((module, format!("PTX {arch} (CUBIN: {cubin_failure})")));
                }
                Err(e) => format!("the driver refused it: {e}"),
            },
            Err(e) => e.to_string(),
        };
        Err(KernelError::NoBinary {
            arch: sm,
            cubin: cubin_failure,
            ptx: ptx_failure,
            nvrtc: nvrtc_version(),
            driver: driver_version(),
        })
    }

    fn load(ctx: Arc<CudaContext>) -> Result<Self, KernelError> {
        let capability = ctx
            .compute_capability()
            .map_err(KernelError::driver("reading the compute capability"))?;
        let name = ctx
            .name()
            .map_err(KernelError::driver("reading the device name"))?;
        let attribute = |a, during| -> Result<usize, KernelError> {
            let v = ctx.attribute(a).map_err(KernelError::driver(during))?;
            Ok(usize::try_from(v).unwrap_or(0))
        };
        let sms = attribute(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "counting multiprocessors",
        )?
        .max(1);
        let l2_bytes = attribute(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE,
            "reading the L2 size",
        )?;
        // SAFETY: every buffer of this type is allocated, used and freed on the one stream
        // below, in order, so there is no other stream to synchronise with; cudarc's
        // per-buffer events would only add driver calls to each allocation and launch.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (module, binary) = Self::load_module(&ctx, capability)?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(KernelError::driver("finding a kernel in the module"))
        };
        let kernels = Kernels {
            project_pair: f("project_pair")?,
            fill: f("fill_f32")?,
            site: [
                f("sq_site_f32_m8")?,
                f("sq_site_f32_m16")?,
                f("sq_site_f32_m64")?,
                f("sq_site_tf32")?,
            ],
        };
        let mut occupancy = [1usize; 4];
        for tile in [Tile::M8, Tile::M16, Tile::M64, Tile::Tf32] {
            if tile == Tile::Tf32 && capability.0 < 8 {
                continue;
            }
            let (_, _, threads) = tile.dims();
            let blocks = kernels.site[tile.index()]
                .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
                .map_err(KernelError::driver("reading a kernel's occupancy"))?;
            occupancy[tile.index()] = (blocks as usize).max(1);
        }
        let build = BuildInfo {
            nvrtc: nvrtc_version(),
            driver: driver_version(),
            binary,
            occupancy,
        };
        Ok(Self {
            ctx,
            stream,
            kernels,
            name,
            capability,
            sms,
            l2_bytes,
            build,
            flush: Mutex::new(None),
            reuse: Mutex::new(Reuse::default()),
            no_event_timing: AtomicBool::new(false),
        })
    }

    /// The device's name as the driver reports it, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// NVRTC and driver versions, the binary loaded, the kernels' occupancy.
    pub fn build_info(&self) -> &BuildInfo {
        &self.build
    }

    /// Whether this device can run `mode` (tf32 needs compute capability 8.0 or later).
    pub fn supports(&self, mode: Mode) -> bool {
        match mode {
            Mode::Fp32 => true,
            Mode::Tf32 => self.capability.0 >= 8,
        }
    }

    /// [`Self::supports`] as a result: [`KernelError::Unsupported`] naming the device
    /// and its compute capability when `mode` cannot run here.
    pub fn check_mode(&self, mode: Mode) -> Result<(), KernelError> {
        if self.supports(mode) {
            Ok(())
        } else {
            Err(KernelError::Unsupported {
                mode,
                device: self.name.clone(),
                capability: self.capability,
            })
        }
    }

    /// Blocks of `tile`'s kernel the whole device holds at once.
    fn resident(&self, tile: Tile) -> usize {
        self.build.occupancy[tile.index()] * self.sms
    }

    /// Scratch for `products` ((m, k, transpose) each) sized for the plans of both modes.
    fn scratch_for(
        &self,
        batch: usize,
        products: &[(usize, usize)],
        max_groups: Option<usize>,
    ) -> Result<Vec<Scratch>, KernelError> {
        let mut sizes = vec![(1usize, 1usize, 1usize); products.len()];
        for mode in [Mode::Fp32, Mode::Tf32] {
            let tile = Tile::pick(products[0].0, mode);
            let plans = plan_site(tile, batch, products, self.resident(tile), max_groups)?;
            for ((s, f, t), (plan, &(m, k))) in sizes.iter_mut().zip(plans.iter().zip(products)) {
                if plan.tiles() > 1 {
                    *s = (*s).max(batch * plan.tiles());
                }
                if plan.groups > 1 {
                    *f = (*f).max(plan.groups * m * k);
                }
                *t = (*t).max(plan.tiles());
            }
        }
        sizes
            .into_iter()
            .map(|(s, f, t)| {
                Ok(Scratch {
                    s_part: self.zeros(s)?,
                    f_part: self.zeros(f)?,
                    tile_done: self.zeros(t)?,
                })
            })
            .collect()
    }

    fn upload(&self, data: &[f32], what: &'static str) -> Result<CudaSlice<f32>, KernelError> {
        self.stream
            .clone_htod(data)
            .map_err(KernelError::driver(what))
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, KernelError> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(KernelError::driver("allocating device memory"))
    }

    fn fill(&self, buf: &mut CudaSlice<f32>, value: f32) -> Result<(), KernelError> {
        let n = buf.len() as i64;
        let cfg = LaunchConfig {
            grid_dim: (buf.len().div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.fill);
        b.arg(&mut *buf).arg(&n).arg(&value);
        // SAFETY: fill_f32(float*, long long, float) writes p[i] for i < n = buf.len().
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(KernelError::driver("launching fill_f32"))
    }

    /// u = x·Aᵀ and δ·B (rows × rank each) in one launch.
    fn project_pair(&self, job: &mut LoraJob) -> Result<(), KernelError> {
        let s = job.shape;
        let rows = s.rows()?;
        let row_blocks = rows.div_ceil(16);
        let (d_in, d_out, rows_, rank, rb) = (
            s.d_in as i32,
            s.d_out as i32,
            rows as i32,
            s.rank as i32,
            row_blocks as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: ((2 * row_blocks) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.project_pair);
        b.arg(&job.x)
            .arg(&d_in)
            .arg(&job.a)
            .arg(&job.delta)
            .arg(&d_out)
            .arg(&job.b)
            .arg(&rows_)
            .arg(&rank)
            .arg(&job.mask)
            .arg(&rb)
            .arg(&mut job.u)
            .arg(&mut job.db);
        // SAFETY: project_pair(const float* x, int d_in, const float* a, const float*
        // delta, int d_out, const float* b, int rows, int rank, const float* mask,
        // int row_blocks, float* u, float* db): x holds rows·d_in floats, delta
        // rows·d_out, a rank·d_in, b d_out·rank, mask rows, u and db rows·rank (the
        // job's shapes, checked when it was made); 2·row_blocks blocks of 16 rows.
        // rows < 2^31 - 128 (shape checks), so 2·row_blocks fits the grid.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(KernelError::driver("launching project_pair"))
    }

    /// Launches the site kernel for one or two products that share a tile kind.
    #[allow(clippy::too_many_arguments)]
    fn launch_site(
        &self,
        products: &[Product<'_>],
        outputs: &mut [Outputs<'_>],
        mask: &CudaSlice<f32>,
        all_done: &CudaSlice<u32>,
        batch: usize,
        seq_len: usize,
        mode: Mode,
        max_groups: Option<usize>,
    ) -> Result<(), KernelError> {
        let tile = Tile::pick(products[0].m, mode);
        let shapes: Vec<(usize, usize)> = products.iter().map(|p| (p.m, p.k)).collect();
        let plans = plan_site(tile, batch, &shapes, self.resident(tile), max_groups)?;
        let st = &*self.stream;
        let mut args = SiteArgs {
            mask: addr(mask, st),
            nprod: products.len() as i32,
            batch: batch as i32,
            seq_len: seq_len as i32,
            ..SiteArgs::default()
        };
        let mut blocks = 0usize;
        let mut any_tiled = false;
        for (i, ((p, plan), out)) in products.iter().zip(&plans).zip(outputs.iter()).enumerate() {
            debug_assert!(plan.tiles() == 1 || out.scratch.s_part.len() >= batch * plan.tiles());
            debug_assert!(plan.groups == 1 || out.scratch.f_part.len() >= plan.groups * p.m * p.k);
            debug_assert!(out.scratch.tile_done.len() >= plan.tiles());
            any_tiled |= plan.tiles() > 1;
            args.p[i] = ProductArgs {
                g: addr(p.g, st),
                x: addr(p.x, st),
                s_part: addr(&out.scratch.s_part, st),
                f_part: addr(&out.scratch.f_part, st),
                s_out: addr(out.s_out, st),
                f_out: addr(out.f_out, st),
                tile_done: addr(&out.scratch.tile_done, st),
                m: p.m as i32,
                k: p.k as i32,
                gscale: p.gscale,
                transpose: i32::from(p.transpose),
                tiles_m: plan.tiles_m as i32,
                tiles_k: plan.tiles_k as i32,
                groups: plan.groups as i32,
            };
            if i == 0 {
                args.blocks0 = plan.blocks() as i32;
            }
            blocks += plan.blocks();
        }
        if blocks > MAX_BLOCKS {
            let (m, k) = shapes[0];
            let (bm, bk, _) = tile.dims();
            return Err(KernelError::Shape(ShapeError::Grid {
                rows: m,
                cols: k,
                tile_rows: bm,
                tile_cols: bk,
                tiles: plans.iter().map(Plan::tiles).sum(),
                limit: MAX_BLOCKS,
            }));
        }
        args.blocks = blocks as i32;
        args.all_done = if any_tiled { addr(all_done, st) } else { 0 };
        let (_, _, threads) = tile.dims();
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.site[tile.index()]);
        b.arg(&args);
        // SAFETY: sq_site_*(const Site s) reads the parameter block laid out as SiteArgs
        // (sizes asserted on both sides). Every address in it is a live buffer of this
        // job, which outlives the launch (read-backs synchronise before the job can be
        // dropped): g and x hold batch·seq_len·M and ·K floats (the job's shapes), mask
        // batch·seq_len; s_part ≥ batch·tiles and f_part ≥ groups·M·K when used, and
        // tile_done ≥ tiles counters (scratch sized by `scratch_for` from the same
        // plans); s_out has batch entries and f_out M·K. The blocks write disjoint
        // entries; the counters are only touched atomically, and reset by the last block.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(KernelError::driver("launching the site kernel"))
    }

    /// Waits for all queued work; a kernel fault surfaces here.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(KernelError::driver("waiting for the kernels"))?;
        self.ctx
            .check_err()
            .map_err(KernelError::driver("releasing device memory"))
    }

    fn download(&self, buf: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>, KernelError> {
        let mut v = self
            .stream
            .clone_dtoh(buf)
            .map_err(KernelError::driver("copying results to the host"))?;
        v.truncate(len);
        Ok(v)
    }

    /// Device time of `work` in µs, from CUDA events recorded on the stream around it
    /// (the host clock would time the launch calls, not the kernels). The events'
    /// elapsed time needs `cuEventElapsedTime_v2` (drivers for CUDA 12.8 and later);
    /// on an older driver cudarc panics on the missing symbol, which is caught here and
    /// answered with the host clock around the work and a synchronisation, so that the
    /// bench still prints its table ([`Timing`] says which clock it was).
    pub fn time_us(
        &self,
        work: impl FnOnce() -> Result<(), KernelError>,
    ) -> Result<(f64, Timing), KernelError> {
        let event = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(KernelError::driver("creating a timing event"))
        };
        let (start, end) = (event()?, event()?);
        self.synchronize()?;
        let host = Instant::now();
        start
            .record(&self.stream)
            .map_err(KernelError::driver("recording an event"))?;
        work()?;
        end.record(&self.stream)
            .map_err(KernelError::driver("recording an event"))?;
        self.synchronize()?;
        let host_us = host.elapsed().as_secs_f64() * 1e6;
        if self.no_event_timing.load(Ordering::Relaxed) {
            return Ok((host_us, Timing::HostClock));
        }
        match guarded("reading an event time", || {
            start
                .elapsed_ms(&end)
                .map_err(KernelError::driver("reading an event time"))
        }) {
            Ok(ms) => Ok((f64::from(ms) * 1e3, Timing::Events)),
            Err(KernelError::Panicked { message, .. }) => {
                // Said once; the default panic hook has printed cudarc's message too.
                if !self.no_event_timing.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "warning: CUDA event times unavailable ({message}); timing with the host clock"
                    );
                }
                Ok((host_us, Timing::HostClock))
            }
            Err(e) => Err(e),
        }
    }

    /// Overwrites a buffer twice the size of the L2 cache (at least 64 MiB), so that the
    /// next timed run reads its inputs from device memory, as triton's do_bench does.
    pub fn flush_l2(&self) -> Result<(), KernelError> {
        let mut slot = self.flush.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(self.zeros::<u8>((2 * self.l2_bytes).max(64 << 20))?);
        }
        if let Some(buf) = slot.as_mut() {
            self.stream
                .memset_zeros(buf)
                .map_err(KernelError::driver("flushing the L2 cache"))?;
        }
        Ok(())
    }

    /// Per-sample squares and diagonal sums of one LoRA site: upload, launch, read back.
    ///
    /// Made for being called once per site of a pass: the device buffers of the last
    /// [`REUSED_JOBS`] shapes are kept and reused, and the inputs are staged through one
    /// pinned host buffer that grows to the largest site seen.
    pub fn lora_site(
        &self,
        inputs: &LoraInputs<'_>,
        mode: Mode,
    ) -> Result<LoraSquares, KernelError> {
        inputs.check()?;
        self.check_mode(mode)?;
        if inputs.shape.is_empty() {
            return Ok(LoraSquares::zeros(&inputs.shape));
        }
        let mut reuse = self.reuse.lock().unwrap_or_else(PoisonError::into_inner);
        let form = inputs.products.is_none();
        let found = reuse
            .jobs
            .iter()
            .position(|j| j.shape == inputs.shape && j.form_products == form);
        let mut job = match found {
            Some(i) => reuse.jobs.remove(i),
            None => self.alloc_lora_job(inputs.shape, form, None)?,
        };
        job.scale = inputs.scale;
        self.stage_lora(&mut reuse, &mut job, inputs)?;
        self.run_lora(&mut job, mode)?;
        let out = self.read_lora(&job);
        // Kept only after a clean run: a job whose kernels failed may hold counters that
        // are not zero.
        if out.is_ok() {
            if reuse.jobs.len() >= REUSED_JOBS {
                reuse.jobs.remove(0);
            }
            reuse.jobs.push(job);
        }
        out
    }

    /// Copies a site's inputs into `job` through the pinned buffer (grown when needed).
    /// The copies are queued on the stream; the buffer is not written again before the
    /// read-back that follows has synchronised the stream.
    fn stage_lora(
        &self,
        reuse: &mut Reuse,
        job: &mut LoraJob,
        inputs: &LoraInputs<'_>,
    ) -> Result<(), KernelError> {
        // The copies from the pinned buffer are asynchronous and nothing else tracks them
        // (cudarc records no event for a plain slice): a previous call that failed before
        // its read-back may still be reading the buffer. Idle on the normal path.
        self.synchronize()?;
        // A and B are read only to form the products; given products make them unused.
        let mut parts: Vec<&[f32]> = vec![inputs.x, inputs.delta, inputs.mask];
        if let Some(p) = &inputs.products {
            parts.push(p.u);
            parts.push(p.db);
        } else {
            parts.push(inputs.a);
            parts.push(inputs.b);
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if reuse.pinned.as_ref().is_none_or(|p| p.len() < total) {
            // Dropped first: the old buffer's memory is released before the new one.
            reuse.pinned = None;
            // SAFETY: the memory is uninitialised; every element read below (by the
            // copies) is written first, part by part.
            let fresh = unsafe { self.ctx.alloc_pinned::<f32>(total) }
                .map_err(KernelError::driver("allocating pinned host memory"))?;
            reuse.pinned = Some(fresh);
        }
        let Some(pinned) = reuse.pinned.as_mut() else {
            return Err(KernelError::Driver {
                during: "staging the inputs",
                message: "no pinned buffer".to_owned(),
            });
        };
        let host = pinned
            .as_mut_slice()
            .map_err(KernelError::driver("mapping the pinned buffer"))?;
        let mut at = 0;
        let mut ranges = Vec::with_capacity(parts.len());
        for part in &parts {
            host[at..at + part.len()].copy_from_slice(part);
            ranges.push(at..at + part.len());
            at += part.len();
        }
        let host: &[f32] = host;
        let mut targets: Vec<&mut CudaSlice<f32>> = vec![&mut job.x, &mut job.delta, &mut job.mask];
        if inputs.products.is_some() {
            targets.push(&mut job.u);
            targets.push(&mut job.db);
        } else {
            targets.push(&mut job.a);
            targets.push(&mut job.b);
        }
        for (range, target) in ranges.into_iter().zip(targets) {
            self.stream
                .memcpy_htod(&host[range], target)
                .map_err(KernelError::driver("copying a site's inputs to the device"))?;
        }
        Ok(())
    }

    /// Per-sample squares and the diagonal sum of a dense linear site.
    pub fn dense_site(
        &self,
        inputs: &DenseInputs<'_>,
        mode: Mode,
    ) -> Result<DenseSquares, KernelError> {
        inputs.check()?;
        self.check_mode(mode)?;
        if inputs.shape.is_empty() {
            return Ok(DenseSquares::zeros(&inputs.shape));
        }
        let mut job = self.dense_job(inputs)?;
        self.run_dense(&mut job, mode)?;
        self.read_dense(&job)
    }

    /// Uploads a LoRA site's batch and allocates its outputs, so that the kernels can be
    /// run (and timed) many times without host copies. Refuses shapes with a zero
    /// dimension ([`Self::lora_site`] answers those with zeros).
    pub fn lora_job(&self, inputs: &LoraInputs<'_>) -> Result<LoraJob, KernelError> {
        self.lora_job_with(inputs, None)
    }

    /// [`Self::lora_job`] with at most `max_groups` sample groups per factor, so that
    /// each block walks several samples (the tests' way to reach that path at small
    /// batches; the plan otherwise gives small batches one sample per block).
    pub fn lora_job_with(
        &self,
        inputs: &LoraInputs<'_>,
        max_groups: Option<usize>,
    ) -> Result<LoraJob, KernelError> {
        inputs.check()?;
        let s = inputs.shape;
        if let Some(dim) = s.zero_dim() {
            return Err(KernelError::Shape(ShapeError::Empty { dim }));
        }
        let mut job = self.alloc_lora_job(s, inputs.products.is_none(), max_groups)?;
        job.scale = inputs.scale;
        job.x = self.upload(inputs.x, "uploading x")?;
        job.delta = self.upload(inputs.delta, "uploading δ")?;
        job.mask = self.upload(inputs.mask, "uploading the mask")?;
        job.a = self.upload(inputs.a, "uploading A")?;
        job.b = self.upload(inputs.b, "uploading B")?;
        if let Some(p) = &inputs.products {
            job.u = self.upload(p.u, "uploading x·Aᵀ")?;
            job.db = self.upload(p.db, "uploading δ·B")?;
        }
        Ok(job)
    }

    /// A LoRA job's device buffers for `shape`, zeroed (inputs not uploaded).
    fn alloc_lora_job(
        &self,
        s: LoraShape,
        form_products: bool,
        max_groups: Option<usize>,
    ) -> Result<LoraJob, KernelError> {
        let n = s.rows()?;
        let mut scratch =
            self.scratch_for(s.batch, &[(s.rank, s.d_in), (s.rank, s.d_out)], max_groups)?;
        let scratch_b = scratch.pop().ok_or(KernelError::Driver {
            during: "planning the scratch",
            message: "no scratch for the B factor".to_owned(),
        })?;
        let scratch_a = scratch.pop().ok_or(KernelError::Driver {
            during: "planning the scratch",
            message: "no scratch for the A factor".to_owned(),
        })?;
        Ok(LoraJob {
            shape: s,
            scale: 1.0,
            form_products,
            max_groups,
            x: self.zeros(n * s.d_in)?,
            delta: self.zeros(n * s.d_out)?,
            mask: self.zeros(n)?,
            a: self.zeros(s.rank * s.d_in)?,
            b: self.zeros(s.d_out * s.rank)?,
            u: self.zeros(n * s.rank)?,
            db: self.zeros(n * s.rank)?,
            sq_a: self.zeros(s.batch)?,
            sq_b: self.zeros(s.batch)?,
            diag_a: self.zeros(s.rank * s.d_in)?,
            diag_b: self.zeros(s.d_out * s.rank)?,
            scratch_a,
            scratch_b,
            all_done: self.zeros(1)?,
        })
    }

    /// Queues the LoRA kernels for `job`; [`Self::read_lora`] waits and reads back.
    ///
    /// Launches: x·Aᵀ and δ·B in one grid unless the caller gave them; then one site
    /// kernel for G_A = (scale·m²·δB)ᵀ·X (r × d_in) and G_Bᵀ = (scale·m²·U)ᵀ·δ
    /// (r × d_out, so that the short side r is the tile's rows for both factors; its
    /// diagonal is written transposed, d_out × r), each squared in the epilogue and
    /// reduced in fixed order.
    pub fn run_lora(&self, job: &mut LoraJob, mode: Mode) -> Result<(), KernelError> {
        self.check_mode(mode)?;
        let s = job.shape;
        if job.form_products {
            self.project_pair(job)?;
        }
        let products = [
            Product {
                g: &job.db,
                m: s.rank,
                x: &job.x,
                k: s.d_in,
                gscale: job.scale,
                transpose: false,
            },
            Product {
                g: &job.u,
                m: s.rank,
                x: &job.delta,
                k: s.d_out,
                gscale: job.scale,
                transpose: true,
            },
        ];
        let mut outputs = [
            Outputs {
                scratch: &mut job.scratch_a,
                s_out: &mut job.sq_a,
                f_out: &mut job.diag_a,
            },
            Outputs {
                scratch: &mut job.scratch_b,
                s_out: &mut job.sq_b,
                f_out: &mut job.diag_b,
            },
        ];
        self.launch_site(
            &products,
            &mut outputs,
            &job.mask,
            &job.all_done,
            s.batch,
            s.seq_len,
            mode,
            job.max_groups,
        )
    }

    /// Waits for the job's kernels and copies its outputs to the host.
    pub fn read_lora(&self, job: &LoraJob) -> Result<LoraSquares, KernelError> {
        self.synchronize()?;
        let s = job.shape;
        let out = LoraSquares {
            sq_a: self.download(&job.sq_a, s.batch)?,
            sq_b: self.download(&job.sq_b, s.batch)?,
            diag_a: self.download(&job.diag_a, s.rank * s.d_in)?,
            diag_b: self.download(&job.diag_b, s.d_out * s.rank)?,
        };
        self.synchronize()?;
        Ok(out)
    }

    /// Fills everything the kernels write (outputs, partial sums, products formed on the
    /// device) with NaN, so that an element a kernel failed to write cannot pass a test.
    /// The counters are left alone: the kernels need them at zero, and reset them.
    pub fn poison_lora(&self, job: &mut LoraJob) -> Result<(), KernelError> {
        for buf in [
            &mut job.sq_a,
            &mut job.sq_b,
            &mut job.diag_a,
            &mut job.diag_b,
            &mut job.scratch_a.s_part,
            &mut job.scratch_a.f_part,
            &mut job.scratch_b.s_part,
            &mut job.scratch_b.f_part,
        ] {
            self.fill(buf, f32::NAN)?;
        }
        if job.form_products {
            self.fill(&mut job.u, f32::NAN)?;
            self.fill(&mut job.db, f32::NAN)?;
        }
        Ok(())
    }

    /// Uploads a dense site's batch and allocates its outputs (see [`Self::lora_job`]).
    pub fn dense_job(&self, inputs: &DenseInputs<'_>) -> Result<DenseJob, KernelError> {
        self.dense_job_with(inputs, None)
    }

    /// [`Self::dense_job`] with at most `max_groups` sample groups (see
    /// [`Self::lora_job_with`]).
    pub fn dense_job_with(
        &self,
        inputs: &DenseInputs<'_>,
        max_groups: Option<usize>,
    ) -> Result<DenseJob, KernelError> {
        inputs.check()?;
        let s = inputs.shape;
        if let Some(dim) = s.zero_dim() {
            return Err(KernelError::Shape(ShapeError::Empty { dim }));
        }
        let scratch = self
            .scratch_for(s.batch, &[(s.d_out, s.d_in)], max_groups)?
            .pop()
            .ok_or(KernelError::Driver {
                during: "planning the scratch",
                message: "no scratch for the product".to_owned(),
            })?;
        Ok(DenseJob {
            shape: s,
            max_groups,
            x: self.upload(inputs.x, "uploading x")?,
            delta: self.upload(inputs.delta, "uploading δ")?,
            mask: self.upload(inputs.mask, "uploading the mask")?,
            sq: self.zeros(s.batch)?,
            diag: self.zeros(s.d_out * s.d_in)?,
            scratch,
            all_done: self.zeros(1)?,
        })
    }

    /// Queues the dense kernel: C_n = (m²·δ_n)ᵀ·X_n (d_out × d_in), squared in the
    /// epilogue, one launch.
    pub fn run_dense(&self, job: &mut DenseJob, mode: Mode) -> Result<(), KernelError> {
        self.check_mode(mode)?;
        let s = job.shape;
        let products = [Product {
            g: &job.delta,
            m: s.d_out,
            x: &job.x,
            k: s.d_in,
            gscale: 1.0,
            transpose: false,
        }];
        let mut outputs = [Outputs {
            scratch: &mut job.scratch,
            s_out: &mut job.sq,
            f_out: &mut job.diag,
        }];
        self.launch_site(
            &products,
            &mut outputs,
            &job.mask,
            &job.all_done,
            s.batch,
            s.seq_len,
            mode,
            job.max_groups,
        )
    }

    /// Waits for the job's kernels and copies its outputs to the host.
    pub fn read_dense(&self, job: &DenseJob) -> Result<DenseSquares, KernelError> {
        self.synchronize()?;
        let s = job.shape;
        let out = DenseSquares {
            sq: self.download(&job.sq, s.batch)?,
            diag: self.download(&job.diag, s.d_out * s.d_in)?,
        };
        self.synchronize()?;
        Ok(out)
    }

    /// Fills everything the dense kernels write with NaN (see [`Self::poison_lora`]).
    pub fn poison_dense(&self, job: &mut DenseJob) -> Result<(), KernelError> {
        for buf in [
            &mut job.sq,
            &mut job.diag,
            &mut job.scratch.s_part,
            &mut job.scratch.f_part,
        ] {
            self.fill(buf, f32::NAN)?;
        }
        Ok(())
    }

    /// The launch plan of a LoRA job in `mode`: (tiles, groups) of the A and B factors,
    /// for tests and the bench's log.
    pub fn lora_plan(&self, job: &LoraJob, mode: Mode) -> Result<[(usize, usize); 2], KernelError> {
        let s = job.shape;
        let tile = Tile::pick(s.rank, mode);
        let plans = plan_site(
            tile,
            s.batch,
            &[(s.rank, s.d_in), (s.rank, s.d_out)],
            self.resident(tile),
            job.max_groups,
        )?;
        Ok([
            (plans[0].tiles(), plans[0].groups),
            (plans[1].tiles(), plans[1].groups),
        ])
    }
}

/// Which clock [`GpuFisher::time_us`] used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// CUDA events on the stream: device time.
    Events,
    /// The host clock around the work and a synchronisation (a driver without
    /// `cuEventElapsedTime_v2`): includes launch and synchronisation overhead.
    HostClock,
}

impl Timing {
    pub fn name(self) -> &'static str {
        match self {
            Self::Events => "cuda events",
            Self::HostClock => "host clock (driver has no cuEventElapsedTime_v2)",
        }
    }
}

/// A LoRA site's batch resident on the device, with its outputs and scratch.
pub struct LoraJob {
    shape: LoraShape,
    scale: f32,
    form_products: bool,
    max_groups: Option<usize>,
    x: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    mask: CudaSlice<f32>,
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    u: CudaSlice<f32>,
    db: CudaSlice<f32>,
    sq_a: CudaSlice<f32>,
    sq_b: CudaSlice<f32>,
    diag_a: CudaSlice<f32>,
    diag_b: CudaSlice<f32>,
    scratch_a: Scratch,
    scratch_b: Scratch,
    all_done: CudaSlice<u32>,
}

impl fmt::Debug for LoraJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoraJob")
            .field("shape", &self.shape)
            .field("form_products", &self.form_products)
            .finish_non_exhaustive()
    }
}

impl LoraJob {
    pub fn shape(&self) -> LoraShape {
        self.shape
    }
}

/// A dense site's batch resident on the device, with its outputs and scratch.
pub struct DenseJob {
    shape: DenseShape,
    max_groups: Option<usize>,
    x: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    mask: CudaSlice<f32>,
    sq: CudaSlice<f32>,
    diag: CudaSlice<f32>,
    scratch: Scratch,
    all_done: CudaSlice<u32>,
}

impl fmt::Debug for DenseJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenseJob")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl DenseJob {
    pub fn shape(&self) -> DenseShape {
        self.shape
    }
}
