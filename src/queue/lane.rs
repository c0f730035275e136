//! A lane of at most a few blocking-pool tasks for the file work that ends each delivery attempt (the unlink of a
//! delivered message, a state file's write, a move to `dead/`).
//!
//! Handed to `spawn_blocking` one by one, every such job woke an idle thread of tokio's pool: a futex wake from the
//! runtime's thread, which the woken thread then often preempted. In a drain of a backlog that was about a seventh
//! of the runtime thread's time. Here a job joins a queue, and a runner (a task on the blocking pool) takes jobs
//! until the queue is empty; a new runner starts only while fewer than `max` run, so that a backlog of jobs
//! costs no wake-ups beyond the runners' own. More than one, because on a filesystem mounted with `discard` each
//! unlink waits for its discard (100–300 µs on the development machine): one runner would put every unlink after
//! the one before. The price of a cap: jobs stuck on a filesystem that hangs hold up every attempt's end, where
//! one `spawn_blocking` each held up only their own (the queue's commits would hang on it as well).
//!
//! tokio's own cap (`max_blocking_threads`) would do the same for every blocking call of the daemon, the spills of
//! incoming mail among them, which must not wait behind delivery's unlinks: so the lane is its own.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::lock;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct Lane {
    queue: Arc<Mutex<Queue>>,
    max: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    runners: usize,
}

impl Lane {
    pub fn new(max: usize) -> Lane {
        Lane {
            queue: Arc::default(),
            max: max.max(1),
        }
    }

    /// Runs `work` on the blocking pool, after the jobs already waiting. `None`: it panicked, or the runtime stopped
    /// before it ran. Dropping the future does not stop the job.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        let start = {
            let mut queue = lock(&self.queue);
            queue.jobs.push_back(job);
            // Another runner starts whenever the cap allows, so that a job never waits behind a slow one while a
            // runner could take it. (A runner between two jobs may take this one; the runner started for it then
            // finds the queue empty: one wake-up, and only when the queue drains.)
            let start = queue.runners < self.max;
            if start {
                queue.runners += 1;
            }
            start
        };
        if start {
            let runner = Runner(Some(self.queue.clone()));
            tokio::task::spawn_blocking(move || runner.run());
        }
        answer.await.ok()
    }
}

/// One runner's claim on the queue. Dropped without running (the runtime was stopping), it gives its place back,
/// and, if it was the last, drops the waiting jobs so that their callers hear `None` rather than wait forever.
struct Runner(Option<Arc<Mutex<Queue>>>);

impl Runner {
    fn run(mut self) {
        let Some(queue) = self.0.take() else {
            return;
        };
        loop {
            let job = {
                let mut q = lock(&queue);
                match q.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        // Under the lock: a job pushed after this sees the runner gone and starts another.
                        q.runners -= 1;
                        return;
                    }
                }
            };
            // A job that panics loses only its own answer (its sender is dropped); the runner goes on.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let Some(queue) = self.0.take() else {
            return;
        };
        let orphans = {
            let mut q = lock(&queue);
            q.runners -= 1;
            if q.runners == 0 {
                std::mem::take(&mut q.jobs)
            } else {
                VecDeque::new()
            }
        };
        drop(orphans);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;
    use std::time::{Duration, Instant};

    const BOUND: Duration = Duration::from_secs(10);

    /// Waits, at most [`BOUND`], until the lane's queue satisfies `done`.
    async fn until(lane: &Lane, done: impl Fn(&Queue) -> bool) {
        let deadline = Instant::now() + BOUND;
        while !done(&lock(&lane.queue)) {
            assert!(Instant::now() < deadline, "the lane never got there");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_job_runs_and_answers_and_a_panic_answers_none() {
        let lane = Lane::new(3);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let lane = lane.clone();
            tasks.spawn(async move {
                lane.run(move || {
                    assert!(i != 7, "job 7 panics");
                    i * 2
                })
                .await
                .map(|v| (i, v))
            });
        }
        let mut answered = 0;
        let all = async {
            while let Some(joined) = tasks.join_next().await {
                if let Some((i, v)) = joined.expect("task") {
                    assert_eq!(v, i * 2);
                    answered += 1;
                }
            }
        };
        tokio::time::timeout(BOUND, all)
            .await
            .expect("every job answers");
        assert_eq!(answered, 199);
        // The runners leave once the queue is empty (a moment after their last answer).
        until(&lane, |q| q.runners == 0 && q.jobs.is_empty()).await;
    }

    /// Jobs that cannot finish yet: the cap's runners take one each, and the rest wait in the queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_jobs_start_runners_up_to_the_cap_and_no_further() {
        let lane = Lane::new(2);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..5u32 {
            let (lane, gate) = (lane.clone(), gate.clone());
            tasks.spawn(async move {
                lane.run(move || {
                    let (open, opened) = &*gate;
                    let deadline = Instant::now() + BOUND;
                    let mut open = lock(open);
                    while !*open && Instant::now() < deadline {
                        open = opened
                            .wait_timeout(open, BOUND)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0;
                    }
                    i
                })
                .await
            });
        }
        until(&lane, |q| q.runners == 2 && q.jobs.len() == 3).await;
        *lock(&gate.0) = true;
        gate.1.notify_all();
        let all = async {
            let mut answers = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                answers.push(joined.expect("task").expect("answered"));
            }
            answers.sort();
            answers
        };
        let answers = tokio::time::timeout(BOUND, all)
            .await
            .expect("every job answers");
        assert_eq!(answers, vec![0, 1, 2, 3, 4]);
        until(&lane, |q| q.runners == 0).await;
    }

    /// A runner the blocking pool never ran (the runtime was stopping) gives its place back, and its waiting jobs'
    /// callers hear `None` instead of waiting forever.
    #[tokio::test]
    async fn a_runner_dropped_unrun_frees_its_place_and_its_callers() {
        let lane = Lane::new(2);
        let (done, answer) = oneshot::channel::<u32>();
        {
            let mut q = lock(&lane.queue);
            q.jobs.push_back(Box::new(move || {
                let _ = done.send(1);
            }));
            q.runners = 1;
        }
        drop(Runner(Some(lane.queue.clone())));
        assert!(answer.await.is_err());
        let q = lock(&lane.queue);
        assert_eq!((q.runners, q.jobs.len()), (0, 0));
    }
}
