//! Phase markers for kernel profiles. A profiler lists a step's kernels in launch order but
//! not which phase enqueued them; with `EFFDET_PHASE_MARKERS=1` the training step launches an
//! empty kernel named after each phase as the phase's last launch (`phase_end_forward`,
//! `phase_end_backward`, `phase_end_update`), so the device check's kernel table can split the
//! step's device time by phase and hold it against `bench-train`'s host-side `phases_ms`.
//! Off by default (each marker is a launch); a no-op on the CPU.

use candle_core::{Device, Result};

/// A training step's phases, as `bench-train`'s `phases_ms` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
    Update,
}

/// Whether `EFFDET_PHASE_MARKERS` is set (to anything but `0`).
pub fn markers_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EFFDET_PHASE_MARKERS").is_ok_and(|v| v != "0"))
}

/// Enqueues the end-of-`phase` marker kernel on `dev` when markers are enabled and `dev` is a
/// GPU; otherwise does nothing.
pub fn phase_end(dev: &Device, phase: Phase) -> Result<()> {
    if !markers_enabled() {
        return Ok(());
    }
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use super::cuda;
            let k = match phase {
                Phase::Forward => cuda::Kernel::new(dev, "phase_end_forward")?,
                Phase::Backward => cuda::Kernel::new(dev, "phase_end_backward")?,
                Phase::Update => cuda::Kernel::new(dev, "phase_end_update")?,
            };
            cuda::launch(k.builder(), cuda::elementwise(1))
        }
        _ => {
            let _ = phase;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_a_no_op_on_the_cpu() -> Result<()> {
        for phase in [Phase::Forward, Phase::Backward, Phase::Update] {
            phase_end(&Device::Cpu, phase)?;
        }
        Ok(())
    }
}
