//! How much device memory a batch needed: what the batch sizer's memory model
//! ([`crate::batching::BatchSizer`]) is calibrated on.
//!
//! The driver's free memory (`cudaMemGetInfo`) counts libtorch's caching allocator's cached blocks
//! and other processes' memory as used: after a large batch the cache stays large, so a smaller
//! batch seems to need as much, and the linear model comes out flat or wrong. The allocator's own
//! peak of live tensors does not have that problem. So a batch is measured, when the C++ bridge
//! can, as the allocator's peak allocated bytes (the window reset before the batch) plus what is
//! held outside the allocator (the CUDA context, library workspaces, other processes), which the
//! batch also needs to find in use; else from the driver's lowest free memory during the batch.
use crate::bridge::AllocatorStats;

/// Where a batch's peak came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeakSource {
    /// The caching allocator's peak (through the C++ bridge).
    Allocator,
    /// The driver's lowest free memory seen (no bridge or no allocator statistics).
    Driver,
}

/// One batch's memory: the device memory in use at its peak and the device's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeakReading {
    pub used: u64,
    pub total: u64,
    pub source: PeakSource,
}

/// Device memory a batch needed, from allocator statistics read at its end (the peak window reset
/// at its start): live tensors at their peak, plus what is held outside the allocator now.
pub fn allocator_peak_used(stats: &AllocatorStats) -> u64 {
    let held = stats.device_total.saturating_sub(stats.device_free);
    let outside = held.saturating_sub(stats.reserved);
    stats.peak_allocated + outside
}

/// What a probe reads memory through: the real device ([`CudaMemory`]) or a fake in tests.
pub trait MemorySource {
    /// Starts a new peak window; false where allocator statistics are unavailable.
    fn reset_peak(&mut self) -> bool;
    fn allocator_stats(&mut self) -> Option<AllocatorStats>;
    /// Free and total bytes as the driver reports them.
    fn driver_free_total(&mut self) -> Option<(u64, u64)>;
}

/// Measures one batch: [`start`](Self::start) before it, [`sample`](Self::sample) while its
/// activations are live (each UNet step, after the VAE decode), [`finish`](Self::finish) after it.
pub struct PeakProbe<S: MemorySource> {
    source: S,
    allocator: bool,
    min_free: Option<u64>,
    total: u64,
}

impl<S: MemorySource> PeakProbe<S> {
    pub fn start(mut source: S) -> Self {
        let allocator = source.reset_peak();
        Self {
            source,
            allocator,
            min_free: None,
            total: 0,
        }
    }

    /// Samples the driver's free memory (only needed without the allocator: its peak is exact).
    pub fn sample(&mut self) {
        if self.allocator {
            return;
        }
        if let Some((free, total)) = self.source.driver_free_total() {
            self.min_free = Some(self.min_free.map_or(free, |m| m.min(free)));
            self.total = total;
        }
    }

    /// The batch's peak; `None` when nothing could be measured (no CUDA).
    pub fn finish(mut self) -> Option<PeakReading> {
        if self.allocator
            && let Some(stats) = self.source.allocator_stats()
        {
            return Some(PeakReading {
                used: allocator_peak_used(&stats),
                total: stats.device_total,
                source: PeakSource::Allocator,
            });
        }
        self.allocator = false;
        self.sample();
        self.min_free.map(|free| PeakReading {
            used: self.total.saturating_sub(free),
            total: self.total,
            source: PeakSource::Driver,
        })
    }
}

/// CUDA device `index` through the bridge, and the driver for free memory.
pub struct CudaMemory(pub usize);

impl MemorySource for CudaMemory {
    fn reset_peak(&mut self) -> bool {
        match crate::bridge::reset_peak(self.0) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "no allocator statistics: measuring with cudaMemGetInfo");
                false
            }
        }
    }

    fn allocator_stats(&mut self) -> Option<AllocatorStats> {
        crate::bridge::memory_stats(self.0).ok()
    }

    fn driver_free_total(&mut self) -> Option<(u64, u64)> {
        crate::device::cuda_memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::{BatchSizer, MemorySample, ShapeKey};
    use crate::pipeline::GenerateParams;
    use crate::pipeline::schedulers::SchedulerKind;
    use std::cell::RefCell;
    use std::rc::Rc;

    const GIB: u64 = 1 << 30;

    /// A fake GPU with a caching allocator: running a batch allocates `base` (weights, always
    /// live) plus `per_image` per image; the allocator keeps what it reserved after the batch
    /// (its cache), as libtorch's does. `outside` is held by the CUDA context and other processes.
    struct FakeGpu {
        total: u64,
        outside: u64,
        base: u64,
        per_image: u64,
        allocated: u64,
        peak_allocated: u64,
        reserved: u64,
        has_allocator_stats: bool,
    }

    impl FakeGpu {
        fn new(has_allocator_stats: bool) -> Self {
            Self {
                total: 80 * GIB,
                outside: GIB,
                base: 6 * GIB,
                per_image: 2 * GIB,
                allocated: 6 * GIB,
                peak_allocated: 6 * GIB,
                reserved: 6 * GIB,
                has_allocator_stats,
            }
        }

        fn set_allocated(&mut self, bytes: u64) {
            self.allocated = bytes;
            self.peak_allocated = self.peak_allocated.max(bytes);
            self.reserved = self.reserved.max(bytes);
        }

        /// The batch's activations at their peak, then freed (to the allocator's cache).
        fn run(&mut self, batch: usize) {
            self.set_allocated(self.base + self.per_image * batch as u64);
            self.set_allocated(self.base);
        }
    }

    #[derive(Clone)]
    struct Shared(Rc<RefCell<FakeGpu>>);

    impl MemorySource for Shared {
        fn reset_peak(&mut self) -> bool {
            let mut g = self.0.borrow_mut();
            g.peak_allocated = g.allocated;
            g.has_allocator_stats
        }
        fn allocator_stats(&mut self) -> Option<AllocatorStats> {
            let g = self.0.borrow();
            g.has_allocator_stats.then(|| AllocatorStats {
                allocated: g.allocated,
                peak_allocated: g.peak_allocated,
                reserved: g.reserved,
                peak_reserved: g.reserved,
                device_free: g.total - g.outside - g.reserved,
                device_total: g.total,
            })
        }
        fn driver_free_total(&mut self) -> Option<(u64, u64)> {
            let g = self.0.borrow();
            Some((g.total - g.outside - g.reserved, g.total))
        }
    }

    /// Runs `batch` on the fake GPU, sampling as the pipeline does (mid-batch and after).
    fn measure(gpu: &Shared, batch: usize) -> PeakReading {
        let mut probe = PeakProbe::start(gpu.clone());
        {
            let mut g = gpu.0.borrow_mut();
            let peak = g.base + g.per_image * batch as u64;
            g.set_allocated(peak);
        }
        probe.sample();
        {
            let mut g = gpu.0.borrow_mut();
            let base = g.base;
            g.set_allocated(base);
        }
        probe.finish().expect("a CUDA fake")
    }

    fn key() -> ShapeKey {
        ShapeKey::of(&GenerateParams {
            steps: 50,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            scheduler: SchedulerKind::Pndm,
            clip_skip: 1,
            guidance_rescale: 0.0,
            prompt_syntax: crate::pipeline::prompt_weights::PromptSyntax::Plain,
            loras: Vec::new(),
        })
    }

    /// Calibrates a sizer with batches of 1 and 2 after a batch of `before` images ran (a
    /// restarted calibration, or another size's batch, left the cache that large).
    fn calibrated_size(gpu: &Shared, before: usize) -> (usize, PeakSource) {
        gpu.0.borrow_mut().run(before);
        let mut sizer = BatchSizer::new(64, 0.10);
        let mut source = PeakSource::Allocator;
        for batch in [1, 2] {
            let r = measure(gpu, batch);
            source = r.source;
            sizer.record(
                &key(),
                MemorySample {
                    batch,
                    peak_used_bytes: r.used,
                },
            );
        }
        (sizer.choose(&key(), Some(80 * GIB)), source)
    }

    #[test]
    fn allocator_peaks_size_batches_right_whatever_the_cache_holds() {
        // 0.9 * 80 GiB = 72; minus 1 GiB outside and 6 GiB weights = 65 GiB; 2 GiB per image.
        for before in [0, 8, 30] {
            let gpu = Shared(Rc::new(RefCell::new(FakeGpu::new(true))));
            assert_eq!(
                calibrated_size(&gpu, before),
                (32, PeakSource::Allocator),
                "after a batch of {before}"
            );
        }
    }

    #[test]
    fn driver_free_memory_is_fooled_by_the_cache() {
        // The fallback: right on a fresh device, but once a batch of 8 filled the cache, batches
        // of 1 and 2 look as large as it and the model has no slope (the ceiling decides, and
        // out-of-memory errors lower it).
        let fresh = Shared(Rc::new(RefCell::new(FakeGpu::new(false))));
        assert_eq!(calibrated_size(&fresh, 0), (32, PeakSource::Driver));
        let cached = Shared(Rc::new(RefCell::new(FakeGpu::new(false))));
        assert_eq!(calibrated_size(&cached, 8), (64, PeakSource::Driver));
    }

    #[test]
    fn outside_memory_counts_once() {
        let stats = AllocatorStats {
            allocated: 6 * GIB,
            peak_allocated: 10 * GIB,
            reserved: 12 * GIB,
            peak_reserved: 12 * GIB,
            device_free: 66 * GIB,
            device_total: 80 * GIB,
        };
        // 80 - 66 = 14 held, 12 of them by the allocator: 2 outside.
        assert_eq!(allocator_peak_used(&stats), 12 * GIB);
    }

    #[test]
    fn no_cuda_reads_nothing() {
        struct Nothing;
        impl MemorySource for Nothing {
            fn reset_peak(&mut self) -> bool {
                false
            }
            fn allocator_stats(&mut self) -> Option<AllocatorStats> {
                None
            }
            fn driver_free_total(&mut self) -> Option<(u64, u64)> {
                None
            }
        }
        let mut probe = PeakProbe::start(Nothing);
        probe.sample();
        assert_eq!(probe.finish(), None);
    }
}
