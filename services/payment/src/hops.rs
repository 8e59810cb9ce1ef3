//! Where a payment's time goes: total time and count of each hop, kept in this process so
//! the load harness (`stagedoor load pay`) can print the share of each. Two relaxed atomic
//! adds per hop; nothing else reads them.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

/// A part of Pay that takes time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    ValidateToken,
    GetHold,
    Record,
    Spend,
    Confirm,
    Refund,
    CompleteToken,
}

impl Hop {
    pub const ALL: [Hop; 7] = [
        Hop::ValidateToken,
        Hop::GetHold,
        Hop::Record,
        Hop::Spend,
        Hop::Confirm,
        Hop::Refund,
        Hop::CompleteToken,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hop::ValidateToken => "queue ValidateToken",
            Hop::GetHold => "concert GetHold",
            Hop::Record => "payment db writes",
            Hop::Spend => "point SpendPoints",
            Hop::Confirm => "concert ConfirmHold",
            Hop::Refund => "point RefundPoints",
            Hop::CompleteToken => "queue CompleteToken",
        }
    }
}

/// Accumulated time per hop.
pub struct HopClock {
    nanos: [AtomicU64; 7],
    calls: [AtomicU64; 7],
}

/// This process's hop times.
pub static HOPS: HopClock = HopClock {
    nanos: [const { AtomicU64::new(0) }; 7],
    calls: [const { AtomicU64::new(0) }; 7],
};

impl HopClock {
    pub fn record(&self, hop: Hop, started: Instant) {
        let index = hop as usize;
        let nanos = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.nanos[index].fetch_add(nanos, Ordering::Relaxed);
        self.calls[index].fetch_add(1, Ordering::Relaxed);
    }

    /// `(hop, total time in seconds, calls)` for every hop.
    pub fn snapshot(&self) -> Vec<(Hop, f64, u64)> {
        Hop::ALL
            .iter()
            .map(|hop| {
                let index = *hop as usize;
                (
                    *hop,
                    self.nanos[index].load(Ordering::Relaxed) as f64 / 1e9,
                    self.calls[index].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    pub fn reset(&self) {
        for index in 0..Hop::ALL.len() {
            self.nanos[index].store(0, Ordering::Relaxed);
            self.calls[index].store(0, Ordering::Relaxed);
        }
    }
}
