//! The engine thread: it opens the model and then runs the jobs sent to it, one at a time (an
//! engine's context is not `Send`, so the model lives and dies on this thread). Callers wait
//! for an answer with the GIL released, in slices of [`SLICE`], and look for Python's signals
//! between them: Ctrl-C raises the job's stop flag, the caller waits for the job to stop (the
//! loop finishes the step in progress), and `KeyboardInterrupt` goes up.

use crate::errors;
use logitprobe::backends::{Backend, EngineOptions, LogitSource, ModelInfo};
use pyo3::prelude::*;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a wait goes without looking for a signal.
pub const SLICE: Duration = Duration::from_millis(50);

/// Work for the engine thread.
type Job = Box<dyn FnOnce(&mut dyn LogitSource) + Send>;

/// The channels of one engine thread, shared with [`OPEN`] so that the interpreter's exit can
/// end the thread.
struct Channels {
    /// `None` once closed; dropping the sender ends the thread after the jobs queued.
    jobs: Mutex<Option<Sender<Job>>>,
    /// Told when the thread has dropped the model and ends; `None` once waited for.
    ended: Mutex<Option<Receiver<()>>>,
    /// The thread itself, joined once it has said it ended (so that none is left running
    /// when the interpreter goes on to exit); `None` once joined.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Every engine thread not yet waited for. A model dropped by the garbage collector only lets
/// its thread end, and a model alive at exit not even that: without [`close_all`] the process
/// would exit (running C++'s static destructors) while a thread still frees llama.cpp's model.
static OPEN: Mutex<Vec<Arc<Channels>>> = Mutex::new(Vec::new());

/// Ends every engine thread and waits until each has freed its model: run at the
/// interpreter's exit (the module registers it with `atexit`).
#[pyfunction]
pub fn close_all(py: Python<'_>) {
    let open = std::mem::take(&mut *OPEN.lock().unwrap_or_else(|e| e.into_inner()));
    for channels in open {
        // A Ctrl-C at exit stops the waiting, not the thread.
        let _ = channels.close(py);
    }
}

impl Channels {
    fn release(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.release();
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(rx) = ended {
            // Disconnected: the thread is gone already.
            match wait(py, rx, None) {
                Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) => {
                    return Err(e)
                }
                _ => {}
            }
        }
        // The model is freed; what is left of the thread is its return.
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = py.detach(move || t.join());
        }
        Ok(())
    }

    /// Whether the thread has ended (or was waited for): nothing left to wait for at exit.
    fn is_done(&self) -> bool {
        match &*self.ended.lock().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some(rx) => !matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        }
    }
}

/// A model on its engine thread.
pub struct Engine {
    channels: Arc<Channels>,
    pub info: ModelInfo,
}

impl Engine {
    /// Opens `path` with `backend` on a new engine thread, waiting for it as any job.
    pub fn open(
        py: Python<'_>,
        backend: Backend,
        path: String,
        opts: EngineOptions,
    ) -> PyResult<Engine> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (ended_tx, ended) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("logitprobe-engine".into())
            .spawn(move || {
                let opened = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    logitprobe::backends::open(backend, &path, &opts)
                }))
                .unwrap_or_else(|p| {
                    Err(anyhow::anyhow!(
                        "opening the model panicked: {}",
                        panic_text(&p)
                    ))
                });
                let mut source = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(source.info().clone()));
                drop(ready_tx);
                // Ends when the Model is closed or dropped (its sender with it).
                while let Ok(job) = rx.recv() {
                    job(&mut *source);
                }
                drop(source);
                let _ = ended_tx.send(());
            })
            .map_err(|e| {
                errors::raise(
                    py,
                    errors::Kind::Engine,
                    format!("cannot start the engine thread: {e}"),
                )
            })?;
        // Ctrl-C while the model loads: the thread finishes loading, finds no job and ends.
        let channels = Arc::new(Channels {
            jobs: Mutex::new(Some(jobs)),
            ended: Mutex::new(Some(ended)),
            thread: Mutex::new(Some(thread)),
        });
        {
            let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|c| !c.is_done());
            open.push(channels.clone());
        }
        let info = wait(py, ready_rx, None)?.map_err(|e| errors::to_py(py, &e))?;
        Ok(Engine { channels, info })
    }

    /// Runs `f` on the engine thread and waits for its answer, the GIL released. Ctrl-C
    /// raises `stop` (which `f` must watch to end early), waits for `f` to return, and raises
    /// `KeyboardInterrupt`. A panic in `f` is an `EngineError`; the engine stays usable.
    pub fn call<T: Send + 'static>(
        &self,
        py: Python<'_>,
        stop: Arc<AtomicBool>,
        f: impl FnOnce(&mut dyn LogitSource) -> anyhow::Result<T> + Send + 'static,
    ) -> PyResult<T> {
        let (tx, rx) = mpsc::channel();
        self.submit(py, move |source| {
            let out =
                std::panic::catch_unwind(AssertUnwindSafe(|| f(source))).unwrap_or_else(|p| {
                    Err(anyhow::anyhow!("the engine panicked: {}", panic_text(&p)))
                });
            let _ = tx.send(out);
        })?;
        wait(py, rx, Some(&stop))?.map_err(|e| errors::to_py(py, &e))
    }

    /// Queues `job` without waiting for it (a stream reads its own channel).
    pub fn submit(
        &self,
        py: Python<'_>,
        job: impl FnOnce(&mut dyn LogitSource) + Send + 'static,
    ) -> PyResult<()> {
        let jobs = self.channels.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let sent = match jobs.as_ref() {
            Some(tx) => tx.send(Box::new(job)).is_ok(),
            None => {
                return Err(errors::raise(
                    py,
                    errors::Kind::Usage,
                    "the model is closed: open it again with logitprobe.Model(...)".into(),
                ))
            }
        };
        if !sent {
            return Err(errors::raise(
                py,
                errors::Kind::Engine,
                "the engine thread has stopped: open the model again".into(),
            ));
        }
        Ok(())
    }

    /// Ends the engine thread once the queued jobs are done and waits until it has freed the
    /// model (Ctrl-C stops the wait, not the thread).
    pub fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.channels.close(py)
    }

    pub fn is_closed(&self) -> bool {
        self.channels
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}

impl Drop for Engine {
    /// Lets the engine thread end once the queued jobs are done, without waiting for it (the
    /// garbage collector must not block; [`close_all`] waits at exit).
    fn drop(&mut self) {
        self.channels.release();
    }
}

/// Waits for one message on `rx`, the GIL released, looking for signals every [`SLICE`]. On a
/// signal's exception (Ctrl-C: `KeyboardInterrupt`) `stop` is raised and, when there is one,
/// the sender is waited for (it answers once it has stopped) before the exception goes up.
pub fn wait<T: Send>(py: Python<'_>, rx: Receiver<T>, stop: Option<&AtomicBool>) -> PyResult<T> {
    wait_keep(py, rx, stop).0
}

/// [`wait`], handing the receiver back for the next message.
pub fn wait_keep<T: Send>(
    py: Python<'_>,
    rx: Receiver<T>,
    stop: Option<&AtomicBool>,
) -> (PyResult<T>, Receiver<T>) {
    let mut rx = rx;
    loop {
        let (got, back) = py.detach(move || (rx.recv_timeout(SLICE), rx));
        rx = back;
        match got {
            Ok(v) => return (Ok(v), rx),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    if let Some(stop) = stop {
                        stop.store(true, Ordering::Relaxed);
                        let (_, back) = py.detach(move || (rx.recv(), rx));
                        rx = back;
                    }
                    return (Err(e), rx);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let e = errors::raise(
                    py,
                    errors::Kind::Engine,
                    "the engine thread stopped without an answer".into(),
                );
                return (Err(e), rx);
            }
        }
    }
}

/// What a panic said.
pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "no message".into())
}
