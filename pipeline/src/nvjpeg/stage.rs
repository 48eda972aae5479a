//! [`NvjpegStage`]: decodes a batch's deferred JPEGs with nvJPEG on one CUDA stream and
//! renders them into the batch's device image tensor (see the parent module for the flow).

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::ffi::{self, Api, Image};
use crate::augment::AugmentConfig;
use crate::decode::{CpuDecoder, DecodedImage, ImageDecoder};
pub use crate::deferred::StageCounts;
use crate::deferred::{
    decode_batch, grow_capacity, render_norm_args, DecodePlan, JpegDecoders, RenderJob,
};
use crate::loader::{Batch, ImageData};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/effdet_render.ptx"));

/// One nvJPEG handle with its decode state.
struct Decoder {
    handle: ffi::Handle,
    state: ffi::State,
    /// Batch size the batched decoder was last initialized for.
    batch: Option<usize>,
}

impl Decoder {
    fn new(api: &Api, backend: c_int) -> anyhow::Result<Decoder> {
        let mut handle = std::ptr::null_mut();
        let null = std::ptr::null_mut();
        // SAFETY: out-pointer to a handle; null allocators select cudaMalloc/cudaHostAlloc.
        ffi::check("nvjpegCreateEx", unsafe {
            (api.create_ex)(backend, null, null, 0, &mut handle)
        })?;
        let mut state = std::ptr::null_mut();
        // SAFETY: handle was just created.
        let s = unsafe { (api.state_create)(handle, &mut state) };
        if let Err(e) = ffi::check("nvjpegJpegStateCreate", s) {
            // SAFETY: handle is live and unused.
            unsafe { (api.destroy)(handle) };
            return Err(e);
        }
        Ok(Decoder {
            handle,
            state,
            batch: None,
        })
    }

    fn destroy(&mut self, api: &Api) {
        // SAFETY: state and handle are live and owned by this decoder.
        unsafe {
            (api.state_destroy)(self.state);
            (api.destroy)(self.handle);
        }
    }
}

/// The GPU decode + render stage. Not `Sync`: one thread drives it.
pub struct NvjpegStage {
    api: Arc<Api>,
    hardware: Option<Decoder>,
    cuda: Decoder,
    /// Parser for the hardware decoder's per-image support check (with the hardware decoder).
    parsed: Option<ffi::JpegStream>,
    stream: Arc<CudaStream>,
    render: CudaFunction,
    arena: Option<CudaSlice<u8>>,
    cfg: AugmentConfig,
    cpu: CpuDecoder,
    decoded: DecodedImage,
    scratch: Vec<f32>,
    pub counts: StageCounts,
    /// Why the hardware decoder is not used, when it is not.
    pub hardware_unavailable: Option<String>,
    /// Decode every image with the CPU decoder (checks the upload + render path exactly).
    pub force_cpu_decode: bool,
}

// SAFETY: the nvJPEG handles are used by one thread at a time (the stage is not Sync); nvJPEG
// handles may move between threads.
unsafe impl Send for NvjpegStage {}

impl NvjpegStage {
    /// Loads nvJPEG, creates the hardware decoder when the GPU has one and the CUDA-backend
    /// decoder, and loads the render kernel into `stream`'s context.
    pub fn new(stream: Arc<CudaStream>, cfg: AugmentConfig) -> anyhow::Result<NvjpegStage> {
        let api = Arc::new(Api::load()?);
        let (hardware, hardware_unavailable) = match Decoder::new(&api, ffi::BACKEND_HARDWARE) {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let cuda = Decoder::new(&api, ffi::BACKEND_DEFAULT)?;
        let parsed = match &hardware {
            Some(hw) => {
                let mut parsed = std::ptr::null_mut();
                // SAFETY: out-pointer; the handle is live.
                ffi::check("nvjpegJpegStreamCreate", unsafe {
                    (api.stream_create)(hw.handle, &mut parsed)
                })?;
                Some(parsed)
            }
            None => None,
        };
        let module = stream.context().load_module(Ptx::from_src(PTX))?;
        let render = module.load_function("effdet_render_batch")?;
        Ok(NvjpegStage {
            api,
            hardware,
            cuda,
            parsed,
            stream,
            render,
            arena: None,
            cfg,
            cpu: CpuDecoder,
            decoded: DecodedImage::default(),
            scratch: Vec::new(),
            counts: StageCounts::default(),
            hardware_unavailable,
            force_cpu_decode: false,
        })
    }

    /// nvJPEG's version, e.g. "13.0".
    pub fn version(&self) -> String {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: out-pointers to ints.
        unsafe {
            (self.api.get_property)(ffi::MAJOR_VERSION, &mut major);
            (self.api.get_property)(ffi::MINOR_VERSION, &mut minor);
        }
        format!("{major}.{minor}")
    }

    /// Fills `out` (`[batch_size, 3, H, W]` f32 on this stage's stream) with the batch's
    /// images: deferred slots decoded and rendered on the GPU, the others uploaded from the
    /// host images. A slot nobody can decode is rendered as the mean colour and its targets
    /// are set to "ignore" ([`Batch::ignore_slot`]), so callers must read the targets after
    /// this call. The work is queued on the stream; the batch must stay alive until the
    /// stream has passed it (its JPEG bytes are read by the decoders).
    pub fn produce(&mut self, batch: &mut Batch, out: &mut CudaSlice<f32>) -> anyhow::Result<()> {
        let (h, w) = batch.image_size;
        let image_len = 3 * h * w;
        anyhow::ensure!(
            out.len() == batch.batch_size * image_len,
            "device image buffer holds {} floats, the batch needs {}",
            out.len(),
            batch.batch_size * image_len
        );
        anyhow::ensure!(
            (h as u32, w as u32) == self.cfg.image_size,
            "batch image size {h}x{w} differs from the stage's"
        );
        self.upload_host_slots(batch, out, image_len)?;
        let plan = DecodePlan::new(batch.deferred_slots());
        if plan.jobs.is_empty() {
            return Ok(());
        }
        self.ensure_arena(plan.arena_bytes)?;
        let mut counts = self.counts;
        let force_cpu = self.force_cpu_decode;
        let jobs = decode_batch(self, batch, &plan, &mut counts, force_cpu);
        self.counts = counts;
        self.launch_render(&jobs, out, h, w)
    }

    fn upload_host_slots(
        &mut self,
        batch: &Batch,
        out: &mut CudaSlice<f32>,
        image_len: usize,
    ) -> anyhow::Result<()> {
        let images = &batch.buffers().images;
        for slot in 0..batch.batch_size {
            if batch.encoded[slot].is_some() {
                continue;
            }
            let range = slot * image_len..(slot + 1) * image_len;
            let host: &[f32] = match images {
                ImageData::F32(v) => &v[range.clone()],
                ImageData::F16(v) => {
                    self.scratch.clear();
                    self.scratch
                        .extend(v[range.clone()].iter().map(|x| x.to_f32()));
                    &self.scratch
                }
            };
            self.stream.memcpy_htod(host, &mut out.slice_mut(range))?;
            if slot < batch.len {
                self.counts.host_rendered += 1;
            }
        }
        Ok(())
    }

    fn ensure_arena(&mut self, bytes: u64) -> anyhow::Result<()> {
        let current = self.arena.as_ref().map_or(0, |a| a.len() as u64);
        let want = grow_capacity(current, bytes);
        if want != current {
            self.arena = None;
            // SAFETY: every byte a job reads is written by its decoder first.
            self.arena = Some(unsafe { self.stream.alloc::<u8>(want as usize) }?);
        }
        Ok(())
    }

    fn destination(&self, job: &RenderJob) -> Image {
        let arena = self.arena.as_ref().expect("arena allocated");
        let (base, _sync) = arena.device_ptr(&self.stream);
        Image::rgbi(base + job.src_offset, job.src_width as usize * 3)
    }

    fn launch_render(
        &mut self,
        jobs: &[RenderJob],
        out: &mut CudaSlice<f32>,
        h: usize,
        w: usize,
    ) -> anyhow::Result<()> {
        let words: Vec<u32> = jobs.iter().flat_map(|j| j.words()).collect();
        let words = self.stream.clone_htod(&words)?;
        let arena = self.arena.as_ref().expect("arena allocated");
        let plane = (h * w) as u32;
        let cfg = LaunchConfig {
            grid_dim: (plane.div_ceil(1024).max(1), jobs.len() as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (out_h, out_w) = (h as u32, w as u32);
        let norm = render_norm_args();
        let mut b = self.stream.launch_builder(&self.render);
        b.arg(arena).arg(&words).arg(out).arg(&out_h).arg(&out_w);
        for v in &norm {
            b.arg(v);
        }
        // SAFETY: the kernel reads `jobs.len()` jobs of JOB_WORDS words, each within the arena
        // (offsets and sizes from the same plan) and writes slot < batch_size planes of `out`.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

impl JpegDecoders for NvjpegStage {
    fn hardware_supports(&mut self, jpeg: &[u8]) -> bool {
        let (Some(hw), Some(parsed)) = (&self.hardware, self.parsed) else {
            return false;
        };
        let mut unsupported: c_int = 1;
        // SAFETY: the parser and handle are live; `jpeg` outlives the calls.
        unsafe {
            (self.api.stream_parse_header)(hw.handle, jpeg.as_ptr(), jpeg.len(), parsed)
                == ffi::STATUS_SUCCESS
                && (self.api.batched_supported)(hw.handle, parsed, &mut unsupported)
                    == ffi::STATUS_SUCCESS
                && unsupported == 0
        }
    }

    fn batched(
        &mut self,
        on_hardware: bool,
        data: &[&[u8]],
        jobs: &[RenderJob],
    ) -> anyhow::Result<()> {
        let dests: Vec<Image> = jobs.iter().map(|j| self.destination(j)).collect();
        let api = self.api.clone();
        let dec = if on_hardware {
            self.hardware.as_mut().expect("hardware decoder")
        } else {
            &mut self.cuda
        };
        if dec.batch != Some(data.len()) {
            // SAFETY: live handle and state.
            ffi::check("nvjpegDecodeBatchedInitialize", unsafe {
                (api.batched_initialize)(
                    dec.handle,
                    dec.state,
                    data.len() as c_int,
                    1,
                    ffi::OUTPUT_RGBI,
                )
            })?;
            dec.batch = Some(data.len());
        }
        let ptrs: Vec<*const u8> = data.iter().map(|d| d.as_ptr()).collect();
        let lens: Vec<usize> = data.iter().map(|d| d.len()).collect();
        let mut dests = dests;
        // SAFETY: arrays of `data.len()` inputs and destinations; each destination points at
        // an arena region sized for its image's RGB; the stream is the arena's.
        let status = unsafe {
            (api.batched)(
                dec.handle,
                dec.state,
                ptrs.as_ptr(),
                lens.as_ptr(),
                dests.as_mut_ptr(),
                self.stream.cu_stream() as ffi::Stream,
            )
        };
        if status != ffi::STATUS_SUCCESS {
            // A failed batch must be re-initialized before the next one.
            dec.batch = None;
        }
        ffi::check("nvjpegDecodeBatched", status)
    }

    fn single(&mut self, jpeg: &[u8], job: &RenderJob) -> anyhow::Result<()> {
        let mut dest = self.destination(job);
        // The single-image call shares the state with batched decoding: re-initialize after.
        self.cuda.batch = None;
        // SAFETY: as in `batched`, for one image.
        ffi::check("nvjpegDecode", unsafe {
            (self.api.decode)(
                self.cuda.handle,
                self.cuda.state,
                jpeg.as_ptr(),
                jpeg.len(),
                ffi::OUTPUT_RGBI,
                &mut dest,
                self.stream.cu_stream() as ffi::Stream,
            )
        })
    }

    fn cpu(&mut self, jpeg: &[u8], job: &RenderJob) -> anyhow::Result<()> {
        self.cpu
            .decode_into(jpeg, &mut self.decoded)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            (self.decoded.height, self.decoded.width) == (job.src_height, job.src_width),
            "decoded {}x{} but the header said {}x{}",
            self.decoded.height,
            self.decoded.width,
            job.src_height,
            job.src_width
        );
        let start = job.src_offset as usize;
        let arena = self.arena.as_mut().expect("arena allocated");
        self.stream.memcpy_htod(
            &self.decoded.rgb,
            &mut arena.slice_mut(start..start + self.decoded.rgb.len()),
        )?;
        Ok(())
    }
}

impl Drop for NvjpegStage {
    fn drop(&mut self) {
        // Decodes may still be running on the stream.
        let _ = self.stream.synchronize();
        // SAFETY: the parser and decoders are owned by the stage and idle after the sync.
        if let Some(parsed) = self.parsed {
            unsafe { (self.api.stream_destroy)(parsed) };
        }
        if let Some(hw) = &mut self.hardware {
            hw.destroy(&self.api);
        }
        self.cuda.destroy(&self.api);
    }
}
