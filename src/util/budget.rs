//! A memory budget for one piece of untrusted work (a model's chat template), enforced by the
//! program's allocator.
//!
//! A Jinja template can grow a value without writing it out (`{% set ns.s = ns.s ~ ns.s %}`
//! in a loop doubles a string 40 times within its fuel), and the growth happens inside the
//! template engine's own code, where no output bound or step count sees it. The one place
//! every allocation passes is the global allocator: [`BudgetAlloc`] counts the bytes a
//! budgeted thread holds, and a thread that asks for more than its budget is never given it.
//!
//! Rust gives an allocator no way to fail an allocation without aborting the process (a null
//! pointer is `handle_alloc_error`, and an allocator must not unwind), so the thread over its
//! budget is parked for good instead: [`run`] sees the mark it left and returns
//! [`OverBudget`], and the parked thread keeps what it held (at most the budget). Callers
//! remember the work that did this so that it is not run, and parked, again.
//!
//! The budget is enforced only where the program's `#[global_allocator]` is [`BudgetAlloc`]
//! (logitprobe's binary and Python module install it); elsewhere [`run`] runs the work on its
//! own thread without a bound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// The system allocator, counting the bytes of budgeted threads.
pub struct BudgetAlloc;

struct Budget {
    limit: usize,
    held: AtomicUsize,
    exceeded: AtomicBool,
}

thread_local! {
    // A const, drop-free thread local: reading it allocates nothing, even while the thread
    // starts or ends.
    static BUDGET: Cell<*const Budget> = const { Cell::new(std::ptr::null()) };
}

fn charge(bytes: usize) {
    let Ok(ptr) = BUDGET.try_with(Cell::get) else {
        return;
    };
    // A panicking thread is not stopped: printing the panic takes std's locks (the
    // backtrace's, the captured output's) that every other thread's panic then waits for.
    if ptr.is_null() || std::thread::panicking() {
        return;
    }
    // SAFETY: the pointer is set by `run`'s worker thread from an `Arc<Budget>` that the
    // same thread owns until it ends, and cleared before that Arc is dropped.
    let budget = unsafe { &*ptr };
    let held = budget.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if held > budget.limit {
        budget.exceeded.store(true, Ordering::Release);
        // From here on this thread allocates unbudgeted (sleeping may allocate nothing, but
        // a panic hook or a thread handle would).
        BUDGET.with(|b| b.set(std::ptr::null()));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

fn credit(bytes: usize) {
    let Ok(ptr) = BUDGET.try_with(Cell::get) else {
        return;
    };
    if !ptr.is_null() {
        // SAFETY: as in `charge`.
        let budget = unsafe { &*ptr };
        // Memory allocated by another thread and freed here (an argument moved in) can take
        // the count below what this thread allocated; it never goes below zero.
        let _ = budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(bytes))
            });
    }
}

// SAFETY: every call is passed to `System` unchanged; the counting around it only reads and
// writes atomics and a thread local that allocates nothing.
unsafe impl GlobalAlloc for BudgetAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        credit(layout.size());
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            charge(new_size - layout.size());
        } else {
            credit(layout.size() - new_size);
        }
        // SAFETY: as in `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The work asked for more memory than its budget; its thread stays parked, holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("took more than {limit} bytes of memory")]
pub struct OverBudget {
    pub limit: usize,
}

/// Runs `work` on a thread of its own whose allocations may hold at most `limit` bytes.
pub fn run<T: Send + 'static>(
    limit: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RunError> {
    let budget = Arc::new(Budget {
        limit,
        held: AtomicUsize::new(0),
        exceeded: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::sync_channel(1);
    let theirs = Arc::clone(&budget);
    std::thread::Builder::new()
        .name("budgeted".into())
        // As deep as the main thread's: a template engine recurses (macros, nested
        // expressions) to its own limits.
        .stack_size(16 << 20)
        .spawn(move || {
            BUDGET.with(|b| b.set(Arc::as_ptr(&theirs)));
            let out = work();
            BUDGET.with(|b| b.set(std::ptr::null()));
            let _ = tx.send(out);
        })
        .map_err(RunError::Spawn)?;
    loop {
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(out) => return Ok(out),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if budget.exceeded.load(Ordering::Acquire) {
                    return Err(RunError::OverBudget(OverBudget { limit }));
                }
            }
            // The work panicked: say so rather than hang.
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(RunError::Panicked),
        }
    }
}

/// Why [`run`] has no result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    OverBudget(OverBudget),
    #[error("cannot start a thread: {0}")]
    Spawn(std::io::Error),
    #[error("the work panicked")]
    Panicked,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_within_its_budget_returns_its_result() {
        let out = run(1 << 20, || vec![7u8; 1000].len()).unwrap();
        assert_eq!(out, 1000);
    }

    #[test]
    fn work_past_its_budget_is_stopped_there() {
        let t0 = std::time::Instant::now();
        let err = run(64 << 20, || {
            let mut s = String::from("x");
            for _ in 0..40 {
                s = s.repeat(2);
            }
            s.len()
        })
        .unwrap_err();
        assert!(matches!(err, RunError::OverBudget(OverBudget { limit }) if limit == 64 << 20));
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_panic_in_the_work_is_an_error_not_a_hang() {
        let err = run(1 << 20, || -> usize { panic!("boom") }).unwrap_err();
        assert!(matches!(err, RunError::Panicked), "{err}");
    }
}
