//! The device side: finding a usable GPU, compiling the CUDA sources once per process
//! with NVRTC, uploading a site's batch and launching the kernels.
//!
//! Every driver call's result is checked and turned into a [`KernelError`]; launches
//! report configuration errors at once and faults at the next synchronisation, which
//! every read-back does before it returns.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, cudaError_enum};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::shape::{DenseInputs, DenseShape, DenseSquares, LoraInputs, LoraShape, LoraSquares};
use crate::{KernelError, Mode, ShapeError};

/// The CUDA C sources, compiled together as one program. `common.cuh` goes first: NVRTC
/// gets no include path, so the shared helpers are prepended rather than `#include`d.
const SOURCES: [&str; 4] = [
    include_str!("../cuda/common.cuh"),
    include_str!("../cuda/reduce.cu"),
    include_str!("../cuda/sq_gemm.cu"),
    include_str!("../cuda/sq_gemm_tf32.cu"),
];

/// Every kernel the host launches; the NVRTC test checks that the PTX defines them all.
pub const KERNEL_NAMES: [&str; 9] = [
    "sample_lengths",
    "project_rows",
    "sum_tiles",
    "sum_groups",
    "fill_f32",
    "sq_gemm_f32_m8",
    "sq_gemm_f32_m16",
    "sq_gemm_f32_m64",
    "sq_gemm_tf32",
];

/// PTX per virtual architecture: NVRTC takes a second or more, so each process compiles
/// once per architecture and every [`GpuFisher`] (one per context) loads the cached text.
static PTX_CACHE: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

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

/// The PTX of all kernels for a virtual architecture such as `compute_90`, compiled by
/// NVRTC on first use and cached for the process. Needs NVRTC but no GPU and no driver,
/// so it also checks the sources on machines without a GPU.
pub fn compile_ptx(arch: &str) -> Result<String, KernelError> {
    {
        let cache = PTX_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, ptx)) = cache.iter().find(|(a, _)| a == arch) {
            return Ok(ptx.clone());
        }
    }
    if !nvrtc_present() {
        return Err(KernelError::NoNvrtc);
    }
    let source = SOURCES.concat();
    let ptx = guarded("compiling with NVRTC", || {
        let options = CompileOptions {
            options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
            name: Some("fibecfed_squares.cu".into()),
            ..CompileOptions::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(&source, options).map_err(|e| {
            let log = match &e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => other.to_string(),
            };
            KernelError::Compile {
                arch: arch.to_owned(),
                log,
            }
        })?;
        Ok(ptx.to_src())
    })?;
    let mut cache = PTX_CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    cache.push((arch.to_owned(), ptx.clone()));
    Ok(ptx)
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
}

/// The launch geometry of one product C_n = G_nᵀ·X_n (M × K) over a batch.
#[derive(Debug, Clone, Copy)]
struct Plan {
    tile: Tile,
    tiles_m: usize,
    tiles_k: usize,
    groups: usize,
    per_group: usize,
}

impl Plan {
    fn tiles(&self) -> usize {
        self.tiles_m * self.tiles_k
    }
}

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

/// Device scratch for the per-tile and per-group partial sums.
struct Scratch {
    s_part: CudaSlice<f32>,
    f_part: CudaSlice<f32>,
}

/// The loaded module's kernels.
struct Kernels {
    sample_lengths: CudaFunction,
    project_rows: CudaFunction,
    sum_tiles: CudaFunction,
    sum_groups: CudaFunction,
    fill: CudaFunction,
    sq_m8: CudaFunction,
    sq_m16: CudaFunction,
    sq_m64: CudaFunction,
    sq_tf32: CudaFunction,
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
    flush: Mutex<Option<CudaSlice<u8>>>,
}

impl fmt::Debug for GpuFisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuFisher")
            .field("device", &self.name)
            .field("ordinal", &self.ctx.ordinal())
            .field("capability", &self.capability)
            .field("multiprocessors", &self.sms)
            .finish_non_exhaustive()
    }
}

fn is_no_device(e: DriverError) -> bool {
    e.0 == cudaError_enum::CUDA_ERROR_NO_DEVICE
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
        let arch = format!("compute_{}{}", capability.0, capability.1);
        let ptx = compile_ptx(&arch)?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(KernelError::driver("loading the compiled kernels"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(KernelError::driver("finding a kernel in the module"))
        };
        let kernels = Kernels {
            sample_lengths: f("sample_lengths")?,
            project_rows: f("project_rows")?,
            sum_tiles: f("sum_tiles")?,
            sum_groups: f("sum_groups")?,
            fill: f("fill_f32")?,
            sq_m8: f("sq_gemm_f32_m8")?,
            sq_m16: f("sq_gemm_f32_m16")?,
            sq_m64: f("sq_gemm_f32_m64")?,
            sq_tf32: f("sq_gemm_tf32")?,
        };
        Ok(Self {
            ctx,
            stream,
            kernels,
            name,
            capability,
            sms,
            l2_bytes,
            flush: Mutex::new(None),
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

    /// Launch geometry: blocks over tiles of C, and the batch split into groups so that
    /// about four blocks per multiprocessor are in flight (LoRA factors have few tiles:
    /// r × d_in of 8 × 384 is 3 tiles). Each group adds one M × K partial to the scratch,
    /// summed in group order afterwards.
    fn plan(&self, batch: usize, m: usize, k: usize, mode: Mode) -> Result<Plan, KernelError> {
        const GRID_YZ: usize = 65_535;
        let tile = Tile::pick(m, mode);
        let (bm, bk, _) = tile.dims();
        let (tiles_m, tiles_k) = (m.div_ceil(bm), k.div_ceil(bk));
        if tiles_m > GRID_YZ {
            return Err(KernelError::Shape(ShapeError::Grid {
                rows: m,
                tiles: tiles_m,
                limit: GRID_YZ,
            }));
        }
        let target = 4 * self.sms;
        let wanted = target.div_ceil(tiles_m * tiles_k).clamp(1, batch.max(1));
        let per_group = batch.div_ceil(wanted).max(batch.div_ceil(GRID_YZ)).max(1);
        let groups = batch.div_ceil(per_group).max(1);
        Ok(Plan {
            tile,
            tiles_m,
            tiles_k,
            groups,
            per_group,
        })
    }

    /// Scratch sizes (s_part, f_part) that cover `products` in both modes.
    fn scratch_len(
        &self,
        batch: usize,
        products: &[(usize, usize, bool)],
    ) -> Result<(usize, usize), KernelError> {
        let (mut s, mut f) = (1, 1);
        for &(m, k, transpose) in products {
            for mode in [Mode::Fp32, Mode::Tf32] {
                let p = self.plan(batch, m, k, mode)?;
                s = s.max(batch * p.tiles());
                if p.groups > 1 || transpose {
                    f = f.max(p.groups * m * k);
                }
            }
        }
        Ok((s, f))
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

    fn scratch(&self, lens: (usize, usize)) -> Result<Scratch, KernelError> {
        Ok(Scratch {
            s_part: self.zeros(lens.0)?,
            f_part: self.zeros(lens.1)?,
        })
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

    fn sample_lengths(
        &self,
        mask: &CudaSlice<f32>,
        batch: usize,
        seq_len: usize,
        lens: &mut CudaSlice<i32>,
    ) -> Result<(), KernelError> {
        let (b_, t_) = (batch as i32, seq_len as i32);
        let cfg = LaunchConfig {
            grid_dim: (batch as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.sample_lengths);
        b.arg(mask).arg(&b_).arg(&t_).arg(&mut *lens);
        // SAFETY: sample_lengths(const float* mask, int batch, int seq_len, int* lens) reads
        // batch·seq_len mask entries and writes batch lengths; both buffers have those sizes.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(KernelError::driver("launching sample_lengths"))
    }

    /// out (rows × rank) = y (rows × d) · Wᵀ with W's element (j, k) at
    /// w[j·rank_stride + k·col_stride].
    fn project(
        &self,
        y: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        w: &CudaSlice<f32>,
        strides: (usize, usize),
        rank: usize,
        mask: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let (rows_, d_, rank_) = (rows as i32, d as i32, rank as i32);
        let (rs, cs) = (strides.0 as i64, strides.1 as i64);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.project_rows);
        b.arg(y)
            .arg(&rows_)
            .arg(&d_)
            .arg(w)
            .arg(&rs)
            .arg(&cs)
            .arg(&rank_)
            .arg(mask)
            .arg(&mut *out);
        // SAFETY: project_rows(const float* y, int rows, int d, const float* w, long long,
        // long long, int rank, const float* mask, float* out): y holds rows·d floats, w
        // rank·d reachable through the strides (checked by the callers' shapes), mask rows,
        // out rows·rank.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(KernelError::driver("launching project_rows"))
    }

    /// Launches one product's square kernel and its fixed-order reductions into s_out
    /// (batch) and f_out (M·K, transposed if asked).
    fn product(
        &self,
        p: &Product<'_>,
        mask: &CudaSlice<f32>,
        lens: &CudaSlice<i32>,
        batch: usize,
        seq_len: usize,
        mode: Mode,
        scratch: &mut Scratch,
        s_out: &mut CudaSlice<f32>,
        f_out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let plan = self.plan(batch, p.m, p.k, mode)?;
        let direct = plan.groups == 1 && !p.transpose;
        let (_, _, threads) = plan.tile.dims();
        let func = match plan.tile {
            Tile::M8 => &self.kernels.sq_m8,
            Tile::M16 => &self.kernels.sq_m16,
            Tile::M64 => &self.kernels.sq_m64,
            Tile::Tf32 => &self.kernels.sq_tf32,
        };
        let tiles = plan.tiles();
        debug_assert!(scratch.s_part.len() >= batch * tiles);
        debug_assert!(direct || scratch.f_part.len() >= plan.groups * p.m * p.k);
        let (m_, k_, b_, t_, pg_) = (
            p.m as i32,
            p.k as i32,
            batch as i32,
            seq_len as i32,
            plan.per_group as i32,
        );
        let gscale = p.gscale;
        let cfg = LaunchConfig {
            grid_dim: (plan.tiles_k as u32, plan.tiles_m as u32, plan.groups as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let f_target = if direct {
                &mut *f_out
            } else {
                &mut scratch.f_part
            };
            let mut b = self.stream.launch_builder(func);
            b.arg(p.g)
                .arg(&m_)
                .arg(p.x)
                .arg(&k_)
                .arg(mask)
                .arg(lens)
                .arg(&b_)
                .arg(&t_)
                .arg(&gscale)
                .arg(&pg_)
                .arg(&mut scratch.s_part)
                .arg(f_target);
            // SAFETY: the sq_gemm_* signature is (const float* g, int M, const float* x,
            // int K, const float* mask, const int* lens, int batch, int seq_len,
            // float gscale, int samples_per_group, float* s_part, float* f_part). g holds
            // batch·seq_len·M floats and x batch·seq_len·K (the job's shapes), mask and
            // lens batch·seq_len and batch; s_part ≥ batch·tiles and f_part ≥ groups·M·K
            // (scratch sized by `scratch_len` from the same plan, or f_out of M·K when
            // there is one group). Blocks write disjoint entries of both.
            unsafe { b.launch(cfg) }
                .map(drop)
                .map_err(KernelError::driver("launching a square kernel"))?;
        }
        let tiles_ = tiles as i32;
        let cfg = LaunchConfig {
            grid_dim: (batch as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.sum_tiles);
        b.arg(&scratch.s_part)
            .arg(&b_)
            .arg(&tiles_)
            .arg(&mut *s_out);
        // SAFETY: sum_tiles(const float* s_part, int batch, int tiles, float* s) reads
        // batch·tiles partials (written above) and writes batch sums; s_out has batch.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(KernelError::driver("launching sum_tiles"))?;
        if !direct {
            let mk = p.m * p.k;
            let (groups_, transpose_) = (plan.groups as i32, i32::from(p.transpose));
            let cfg = LaunchConfig {
                grid_dim: (mk.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&self.kernels.sum_groups);
            b.arg(&scratch.f_part)
                .arg(&groups_)
                .arg(&m_)
                .arg(&k_)
                .arg(&transpose_)
                .arg(&mut *f_out);
            // SAFETY: sum_groups(const float* f_part, int groups, int M, int K,
            // int transpose, float* f) reads groups·M·K partials and writes M·K entries;
            // f_out has M·K.
            unsafe { b.launch(cfg) }
                .map(drop)
                .map_err(KernelError::driver("launching sum_groups"))?;
        }
        Ok(())
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
    /// (the host clock would time the launch calls, not the kernels).
    pub fn time_us(
        &self,
        work: impl FnOnce() -> Result<(), KernelError>,
    ) -> Result<f64, KernelError> {
        let event = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(KernelError::driver("creating a timing event"))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(&self.stream)
            .map_err(KernelError::driver("recording an event"))?;
        work()?;
        end.record(&self.stream)
            .map_err(KernelError::driver("recording an event"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(KernelError::driver("reading an event time"))?;
        self.synchronize()?;
        Ok(f64::from(ms) * 1e3)
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
        let mut job = self.lora_job(inputs)?;
        self.run_lora(&mut job, mode)?;
        self.read_lora(&job)
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
        inputs.check()?;
        let s = inputs.shape;
        if let Some(dim) = s.zero_dim() {
            return Err(KernelError::Shape(ShapeError::Empty { dim }));
        }
        let n = s.rows()?;
        let (u, db) = match &inputs.products {
            Some(p) => (
                self.upload(p.u, "uploading x·Aᵀ")?,
                self.upload(p.db, "uploading δ·B")?,
            ),
            None => (self.zeros(n * s.rank)?, self.zeros(n * s.rank)?),
        };
        let scratch = self.scratch(
            self.scratch_len(s.batch, &[(s.rank, s.d_in, false), (s.rank, s.d_out, true)])?,
        )?;
        Ok(LoraJob {
            shape: s,
            scale: inputs.scale,
            form_products: inputs.products.is_none(),
            x: self.upload(inputs.x, "uploading x")?,
            delta: self.upload(inputs.delta, "uploading δ")?,
            mask: self.upload(inputs.mask, "uploading the mask")?,
            a: self.upload(inputs.a, "uploading A")?,
            b: self.upload(inputs.b, "uploading B")?,
            u,
            db,
            lens: self.zeros(s.batch)?,
            sq_a: self.zeros(s.batch)?,
            sq_b: self.zeros(s.batch)?,
            diag_a: self.zeros(s.rank * s.d_in)?,
            diag_b: self.zeros(s.d_out * s.rank)?,
            scratch,
        })
    }

    /// Queues the LoRA kernels for `job`; [`Self::read_lora`] waits and reads back.
    ///
    /// Launches: sample lengths; x·Aᵀ and δ·B unless the caller gave them; then
    /// G_A = (scale·m²·δB)ᵀ·X (r × d_in) and G_Bᵀ = (scale·m²·U)ᵀ·δ (r × d_out, so that
    /// the short side r is the tile's rows for both factors; its diagonal is written
    /// transposed, d_out × r), each squared in the epilogue and reduced in fixed order.
    pub fn run_lora(&self, job: &mut LoraJob, mode: Mode) -> Result<(), KernelError> {
        self.check_mode(mode)?;
        let s = job.shape;
        let n = s.rows()?;
        self.sample_lengths(&job.mask, s.batch, s.seq_len, &mut job.lens)?;
        if job.form_products {
            self.project(
                &job.x,
                n,
                s.d_in,
                &job.a,
                (s.d_in, 1),
                s.rank,
                &job.mask,
                &mut job.u,
            )?;
            self.project(
                &job.delta,
                n,
                s.d_out,
                &job.b,
                (1, s.rank),
                s.rank,
                &job.mask,
                &mut job.db,
            )?;
        }
        let grad_a = Product {
            g: &job.db,
            m: s.rank,
            x: &job.x,
            k: s.d_in,
            gscale: job.scale,
            transpose: false,
        };
        self.product(
            &grad_a,
            &job.mask,
            &job.lens,
            s.batch,
            s.seq_len,
            mode,
            &mut job.scratch,
            &mut job.sq_a,
            &mut job.diag_a,
        )?;
        let grad_b = Product {
            g: &job.u,
            m: s.rank,
            x: &job.delta,
            k: s.d_out,
            gscale: job.scale,
            transpose: true,
        };
        self.product(
            &grad_b,
            &job.mask,
            &job.lens,
            s.batch,
            s.seq_len,
            mode,
            &mut job.scratch,
            &mut job.sq_b,
            &mut job.diag_b,
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
    pub fn poison_lora(&self, job: &mut LoraJob) -> Result<(), KernelError> {
        for buf in [
            &mut job.sq_a,
            &mut job.sq_b,
            &mut job.diag_a,
            &mut job.diag_b,
            &mut job.scratch.s_part,
            &mut job.scratch.f_part,
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
        inputs.check()?;
        let s = inputs.shape;
        if let Some(dim) = s.zero_dim() {
            return Err(KernelError::Shape(ShapeError::Empty { dim }));
        }
        let scratch = self.scratch(self.scratch_len(s.batch, &[(s.d_out, s.d_in, false)])?)?;
        Ok(DenseJob {
            shape: s,
            x: self.upload(inputs.x, "uploading x")?,
            delta: self.upload(inputs.delta, "uploading δ")?,
            mask: self.upload(inputs.mask, "uploading the mask")?,
            lens: self.zeros(s.batch)?,
            sq: self.zeros(s.batch)?,
            diag: self.zeros(s.d_out * s.d_in)?,
            scratch,
        })
    }

    /// Queues the dense kernels: C_n = (m²·δ_n)ᵀ·X_n (d_out × d_in), squared in the
    /// epilogue.
    pub fn run_dense(&self, job: &mut DenseJob, mode: Mode) -> Result<(), KernelError> {
        self.check_mode(mode)?;
        let s = job.shape;
        self.sample_lengths(&job.mask, s.batch, s.seq_len, &mut job.lens)?;
        let grad = Product {
            g: &job.delta,
            m: s.d_out,
            x: &job.x,
            k: s.d_in,
            gscale: 1.0,
            transpose: false,
        };
        self.product(
            &grad,
            &job.mask,
            &job.lens,
            s.batch,
            s.seq_len,
            mode,
            &mut job.scratch,
            &mut job.sq,
            &mut job.diag,
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
}

/// A LoRA site's batch resident on the device, with its outputs and scratch.
pub struct LoraJob {
    shape: LoraShape,
    scale: f32,
    form_products: bool,
    x: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    mask: CudaSlice<f32>,
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    u: CudaSlice<f32>,
    db: CudaSlice<f32>,
    lens: CudaSlice<i32>,
    sq_a: CudaSlice<f32>,
    sq_b: CudaSlice<f32>,
    diag_a: CudaSlice<f32>,
    diag_b: CudaSlice<f32>,
    scratch: Scratch,
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
    x: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    mask: CudaSlice<f32>,
    lens: CudaSlice<i32>,
    sq: CudaSlice<f32>,
    diag: CudaSlice<f32>,
    scratch: Scratch,
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
