//! The dozen nvJPEG entry points the stage uses, loaded from `libnvjpeg` at run time with
//! `libloading` (declarations written from CUDA 13's `nvjpeg.h`). Loading at run time means
//! the binary starts on machines without nvJPEG and can say clearly what is missing.

use std::ffi::{c_int, c_uint, c_void};

pub type Status = c_int;
pub type Handle = *mut c_void;
pub type State = *mut c_void;
pub type JpegStream = *mut c_void;
/// `cudaStream_t`, the same object as the driver's `CUstream`.
pub type Stream = *mut c_void;

pub const STATUS_SUCCESS: Status = 0;
pub const BACKEND_DEFAULT: c_int = 0;
pub const BACKEND_HARDWARE: c_int = 3;
pub const OUTPUT_RGBI: c_int = 5;
/// `libraryPropertyType` values.
pub const MAJOR_VERSION: c_int = 0;
pub const MINOR_VERSION: c_int = 1;

/// `nvjpegImage_t`: up to four planes; interleaved RGB uses plane 0 only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Image {
    pub channel: [*mut u8; 4],
    pub pitch: [usize; 4],
}

impl Image {
    /// Interleaved RGB at `ptr` with rows `pitch` bytes apart.
    pub fn rgbi(ptr: u64, pitch: usize) -> Image {
        Image {
            channel: [
                ptr as *mut u8,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ],
            pitch: [pitch, 0, 0, 0],
        }
    }
}

/// Names of `nvjpegStatus_t` values (for error messages).
pub fn status_name(s: Status) -> &'static str {
    match s {
        0 => "NVJPEG_STATUS_SUCCESS",
        1 => "NVJPEG_STATUS_NOT_INITIALIZED",
        2 => "NVJPEG_STATUS_INVALID_PARAMETER",
        3 => "NVJPEG_STATUS_BAD_JPEG",
        4 => "NVJPEG_STATUS_JPEG_NOT_SUPPORTED",
        5 => "NVJPEG_STATUS_ALLOCATOR_FAILURE",
        6 => "NVJPEG_STATUS_EXECUTION_FAILED",
        7 => "NVJPEG_STATUS_ARCH_MISMATCH",
        8 => "NVJPEG_STATUS_INTERNAL_ERROR",
        9 => "NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED",
        10 => "NVJPEG_STATUS_INCOMPLETE_BITSTREAM",
        _ => "unknown nvJPEG status",
    }
}

/// `Ok` for success, else an error naming the call and the status.
pub fn check(call: &str, s: Status) -> anyhow::Result<()> {
    if s == STATUS_SUCCESS {
        Ok(())
    } else {
        anyhow::bail!("{call} failed: {} ({s})", status_name(s))
    }
}

/// Shared-library names tried in order.
pub const LIBRARY_NAMES: [&str; 3] = ["libnvjpeg.so.13", "libnvjpeg.so.12", "libnvjpeg.so"];

macro_rules! api {
    ($($field:ident = $sym:literal : fn($($arg:ty),*);)*) => {
        /// The loaded library and its entry points.
        pub struct Api {
            $(pub $field: unsafe extern "C" fn($($arg),*) -> Status,)*
            _lib: libloading::Library,
        }

        impl Api {
            /// Loads the first of [`LIBRARY_NAMES`] found on the loader path.
            pub fn load() -> anyhow::Result<Api> {
                let mut tried = Vec::new();
                for name in LIBRARY_NAMES {
                    // SAFETY: loading nvJPEG runs only its (CUDA runtime) initializers.
                    match unsafe { libloading::Library::new(name) } {
                        Ok(lib) => return Self::resolve(lib, name),
                        Err(e) => tried.push(format!("{name}: {e}")),
                    }
                }
                anyhow::bail!(
                    "cannot load nvJPEG ({}); put the directory holding libnvjpeg.so.13 \
                     (the nvidia-nvjpeg wheel's nvidia/cu13/lib, or the CUDA toolkit's lib64) \
                     on LD_LIBRARY_PATH",
                    tried.join("; ")
                )
            }

            fn resolve(lib: libloading::Library, name: &str) -> anyhow::Result<Api> {
                // SAFETY: each symbol is declared with the signature nvjpeg.h gives it.
                unsafe {
                    Ok(Api {
                        $($field: *lib
                            .get::<unsafe extern "C" fn($($arg),*) -> Status>($sym)
                            .map_err(|e| anyhow::anyhow!("{name} lacks {}: {e}",
                                String::from_utf8_lossy(&$sym[..$sym.len() - 1])))?,)*
                        _lib: lib,
                    })
                }
            }
        }
    };
}

api! {
    get_property = b"nvjpegGetProperty\0": fn(c_int, *mut c_int);
    create_ex = b"nvjpegCreateEx\0": fn(c_int, *mut c_void, *mut c_void, c_uint, *mut Handle);
    destroy = b"nvjpegDestroy\0": fn(Handle);
    state_create = b"nvjpegJpegStateCreate\0": fn(Handle, *mut State);
    state_destroy = b"nvjpegJpegStateDestroy\0": fn(State);
    decode = b"nvjpegDecode\0": fn(Handle, State, *const u8, usize, c_int, *mut Image, Stream);
    batched_initialize = b"nvjpegDecodeBatchedInitialize\0": fn(Handle, State, c_int, c_int, c_int);
    batched = b"nvjpegDecodeBatched\0": fn(Handle, State, *const *const u8, *const usize, *mut Image, Stream);
    stream_create = b"nvjpegJpegStreamCreate\0": fn(Handle, *mut JpegStream);
    stream_destroy = b"nvjpegJpegStreamDestroy\0": fn(JpegStream);
    stream_parse_header = b"nvjpegJpegStreamParseHeader\0": fn(Handle, *const u8, usize, JpegStream);
    batched_supported = b"nvjpegDecodeBatchedSupported\0": fn(Handle, JpegStream, *mut c_int);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_named_and_checked() {
        assert!(check("x", 0).is_ok());
        let e = check("nvjpegDecode", 3).unwrap_err().to_string();
        assert_eq!(e, "nvjpegDecode failed: NVJPEG_STATUS_BAD_JPEG (3)");
        assert_eq!(status_name(42), "unknown nvJPEG status");
    }

    #[test]
    fn image_descriptor_has_the_c_layout() {
        // nvjpegImage_t: unsigned char *channel[4]; size_t pitch[4];
        assert_eq!(std::mem::size_of::<Image>(), 64);
        let img = Image::rgbi(0x1000, 30);
        assert_eq!((img.channel[0] as u64, img.pitch[0]), (0x1000, 30));
        assert!(img.channel[1].is_null());
    }
}
