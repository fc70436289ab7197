//! The VM manager's fault paths, with the test driver and a store that can be slowed or made
//! to fail: slow disks, a sequence file that cannot be written, stale VMM reports, a stop that
//! gives up, a failed VM whose VMM still runs, a guest that powers off during boot, report
//! floods, bounded tail and follow, leaks after remove, and where numbering resumes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::driver::{Step, TestDriver};
use common::store::TestStore;
use my_hypervisor_frontend::rpc::errors::{self, ApiError};
use my_hypervisor_frontend::vm::events::FOLLOW_PAGE;
use my_hypervisor_frontend::vm::manager::SEQ_RECOVERY_GAP;
use my_hypervisor_frontend::vm::store::SEQUENCE_FILE;
use my_hypervisor_frontend::vm::{Manager, ManagerConfig, VmSpec, VmState, VmmEvent, VmmReport};
use serde_json::{Value, json};

fn spec(id: &str) -> VmSpec {
    serde_json::from_value(json!({"id": id, "vcpus": 1, "memory_mib": 256, "kernel": "/img/vmlinux"})).unwrap()
}

fn config(dir: &Path) -> ManagerConfig {
    ManagerConfig::new(dir, vec![PathBuf::from("/img")])
}

fn open(dir: &Path, d: &Arc<TestDriver>) -> Manager {
    Manager::open(config(dir), Some(Arc::clone(d) as _)).unwrap()
}

fn open_with(cfg: ManagerConfig, d: &Arc<TestDriver>, store: &Arc<TestStore>) -> Manager {
    Manager::open_with_store(cfg, Some(Arc::clone(d) as _), Arc::clone(store) as _).unwrap()
}

fn report(generation: u64, offset: Option<u64>, event: VmmEvent) -> VmmReport {
    VmmReport { generation, offset, event }
}

fn gen_of(d: &TestDriver) -> u64 {
    d.generation.load(Ordering::SeqCst)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "{what} did not happen within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn file(dir: &Path, id: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(format!("{id}.json"))).unwrap()).unwrap()
}

/// The largest sequence number in any VM file of the dir.
fn max_on_disk(dir: &Path) -> u64 {
    let mut max = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(id) = name.strip_suffix(".json") {
            for t in file(dir, id)["history"].as_array().unwrap() {
                max = max.max(t["seq"].as_u64().unwrap());
            }
        }
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_while_transitions_persist_slowly() {
    let dir = tempfile::tempdir().unwrap();
    let (d, store) = (Arc::new(TestDriver::default()), Arc::new(TestStore::new(dir.path())));
    let m = open_with(config(dir.path()), &d, &store);
    for id in ["a", "b", "c", "d"] {
        m.create(spec(id)).await.unwrap();
    }
    store.set_delay(Duration::from_millis(300));
    let starts: Vec<_> = ["a", "b", "c"]
        .map(|id| {
            let m = m.clone();
            tokio::spawn(async move { m.start(id).await })
        })
        .into();
    eventually("the starts under way", || m.state("a").unwrap() != VmState::Pending).await;
    let mut slowest = Duration::ZERO;
    while !starts.iter().all(|s| s.is_finished()) {
        let t = Instant::now();
        assert_eq!(m.status("d").unwrap().state, VmState::Pending);
        assert_eq!(m.list().len(), 4);
        m.tail(None, 0, 10).unwrap();
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in starts {
        assert_eq!(s.await.unwrap(), Ok(VmState::Running));
    }
    eprintln!("slowest status while transitions persisted: {slowest:?}");
    assert!(slowest < Duration::from_millis(50), "status waited {slowest:?} for the disk");
    let batches = store.batches.lock().unwrap().clone();
    assert!(batches.iter().any(|&n| n >= 2), "transitions of several VMs shared a batch: {batches:?}");
    store.set_delay(Duration::ZERO);
}

#[tokio::test]
async fn a_sequence_file_that_cannot_be_written_strands_no_vm_and_numbers_never_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let (d, store) = (Arc::new(TestDriver::default()), Arc::new(TestStore::new(dir.path())));
    let mut cfg = config(dir.path());
    cfg.seq_block = 2; // a write of the mark every other transition
    let m = open_with(cfg.clone(), &d, &store);
    m.create(spec("a")).await.unwrap();
    m.create(spec("b")).await.unwrap();
    store.fail_sequence.store(true, Ordering::SeqCst);
    // Every side effect is followed by a transition whose mark cannot be written.
    assert_eq!(m.start("a").await, Ok(VmState::Running));
    assert_eq!(m.start("b").await, Ok(VmState::Running));
    assert!(m.sequence_behind());
    assert_eq!(m.stop("a", None).await, Ok(VmState::Stopped));
    assert_eq!(m.stop("b", None).await, Ok(VmState::Stopped));
    m.remove("b").await.unwrap();
    assert_eq!(m.status("b").unwrap_err(), my_hypervisor_frontend::vm::VmError::no_such_vm("b"));
    let handed_out = m.last_seq();
    let on_disk: u64 = std::fs::read_to_string(dir.path().join(SEQUENCE_FILE)).unwrap().trim().parse().unwrap();
    assert!(on_disk < handed_out, "the mark {on_disk} is behind {handed_out}");
    // A crash now: b's file is still there (its numbers are above the mark), a's too.
    drop(m);
    assert!(dir.path().join("b.json").exists(), "a file is not deleted while the mark is behind");
    assert!(max_on_disk(dir.path()) > on_disk);
    let m = open_with(cfg.clone(), &d, &store);
    // The removal's own number (the last handed out) is in no file; the gap covers it.
    assert_eq!(m.last_seq(), handed_out - 1 + SEQ_RECOVERY_GAP, "numbering resumes far above {handed_out}");
    // Once the disk is back, the mark catches up and the remove finishes.
    store.fail_sequence.store(false, Ordering::SeqCst);
    m.remove("b").await.unwrap();
    eventually("the mark written", || !m.sequence_behind()).await;
    eventually("b's file deleted", || !dir.path().join("b.json").exists()).await;
    assert_eq!(m.start("a").await, Ok(VmState::Running));
    assert!(m.tail(Some("a"), 0, 1000).unwrap().events.iter().any(|e| e.seq > handed_out - 1 + SEQ_RECOVERY_GAP));
}

#[tokio::test]
async fn an_exit_of_the_previous_vmm_does_not_stop_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    m.create(spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    let old = gen_of(&d);
    m.stop("a", None).await.unwrap();
    // The old VMM's exit is still queued when the next start begins.
    d.set_delay(Step::Prepare, Duration::from_millis(200));
    let m2 = m.clone();
    let start = tokio::spawn(async move { m2.start("a").await });
    eventually("the start holds the VM", || m.state("a").unwrap() == VmState::Provisioning).await;
    m.report("a", report(old, None, VmmEvent::Exited { clean: true, detail: "exit status 0".into() }));
    assert_eq!(start.await.unwrap(), Ok(VmState::Running));
    eventually("the report applied", || m.report_queues() == 0).await;
    assert_eq!(m.state("a").unwrap(), VmState::Running);
    assert!(gen_of(&d) > old);
    // The current VMM's exit does count.
    m.report("a", report(gen_of(&d), None, VmmEvent::Exited { clean: true, detail: "exit status 0".into() }));
    eventually("the guest shut down", || m.state("a").unwrap() == VmState::Stopped).await;
}

#[tokio::test]
async fn a_stop_that_gives_up_leaves_the_start_it_raced_to_finish() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let mut cfg = config(dir.path());
    cfg.op_wait = Duration::from_millis(100);
    let m = Manager::open(cfg, Some(Arc::clone(&d) as _)).unwrap();
    m.create(spec("a")).await.unwrap();
    d.set_delay(Step::Prepare, Duration::from_millis(400));
    let m2 = m.clone();
    let start = tokio::spawn(async move { m2.start("a").await });
    eventually("the start holds the VM", || m.state("a").unwrap() == VmState::Provisioning).await;
    let e = m.stop("a", None).await.unwrap_err();
    assert_eq!(ApiError::from(e).code(), errors::BUSY);
    assert_eq!(start.await.unwrap(), Ok(VmState::Running), "the start is not left in starting");
    assert_eq!(m.state("a").unwrap(), VmState::Running);
    assert_eq!(m.stop("a", None).await, Ok(VmState::Stopped));
}

#[tokio::test]
async fn a_failed_vm_whose_vmm_still_runs_can_be_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    m.create(spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    m.vmm_event("a", report(gen_of(&d), None, VmmEvent::GuestPanic)).await.unwrap();
    let st = m.status("a").unwrap();
    assert_eq!((st.state, st.pid.is_some()), (VmState::Failed, true), "the panicked guest's VMM is still there");
    let (stops, releases) = (d.calls(Step::Stop), d.calls(Step::Release));
    assert_eq!(m.stop("a", None).await, Ok(VmState::Stopped));
    assert_eq!((d.calls(Step::Stop), d.calls(Step::Release)), (stops + 1, releases + 1));
    assert_eq!(m.status("a").unwrap().pid, None);
    // A failed VM with no VMM is not running.
    m.start("a").await.unwrap();
    m.vmm_event("a", report(gen_of(&d), None, VmmEvent::Exited { clean: false, detail: "signal 9".into() }))
        .await
        .unwrap();
    assert_eq!(ApiError::from(m.stop("a", None).await.unwrap_err()).code(), errors::NOT_RUNNING);
}

#[tokio::test]
async fn recovery_checks_the_vmm_before_it_fails_a_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    for id in ["run", "cfg"] {
        m.create(spec(id)).await.unwrap();
        m.start(id).await.unwrap();
    }
    drop(m);
    // "cfg" was cut short between its spawn and the record of it.
    let mut f = file(dir.path(), "cfg");
    f["state"] = json!("configured");
    std::fs::write(dir.path().join("cfg.json"), serde_json::to_vec(&f).unwrap()).unwrap();
    let d2 = Arc::new(TestDriver::default());
    *d2.reattach.lock().unwrap() = Some(Err("the broker did not answer".into()));
    let m = open(dir.path(), &d2);
    m.recover();
    eventually("recovery", || {
        m.state("run").unwrap() == VmState::Failed && m.state("cfg").unwrap() == VmState::StartFailed
    })
    .await;
    assert_eq!(d2.calls(Step::Release), 1, "the configured VM was released, which reaps a VMM it had");
    let st = m.status("run").unwrap();
    assert!(st.pid.is_some(), "whether its VMM runs is unknown: the pid stays");
    assert!(st.last_error.unwrap().contains("the broker did not answer"));
    assert_eq!(m.stop("run", None).await, Ok(VmState::Stopped));
    assert_eq!(d2.calls(Step::Release), 2);
}

#[tokio::test]
async fn a_guest_that_powers_off_during_boot_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    m.create(spec("a")).await.unwrap();
    d.power_off_at_boot.store(true, Ordering::SeqCst);
    assert_eq!(m.start("a").await, Ok(VmState::Stopped));
    let events = m.tail(Some("a"), 0, 100).unwrap().events;
    let last: Vec<_> = events.iter().rev().take(2).rev().map(|e| (e.from.unwrap(), e.to.state().unwrap())).collect();
    assert_eq!(last, [(VmState::Starting, VmState::Running), (VmState::Running, VmState::Stopped)]);
    assert!(events.last().unwrap().reason.contains("powered off"), "{:?}", events.last());
    let st = m.status("a").unwrap();
    assert_eq!((st.pid, st.last_error), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_reboots_is_merged_and_other_vms_stay_quick() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    for id in ["a", "b"] {
        m.create(spec(id)).await.unwrap();
        m.start(id).await.unwrap();
    }
    let (g, before) = (gen_of(&d) - 1, m.last_seq());
    let m2 = m.clone();
    let flood = tokio::task::spawn_blocking(move || {
        for i in 0..100_000u64 {
            m2.report("a", report(g, Some(i), VmmEvent::GuestReboot { count: 1 }));
        }
    });
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() || m.report_queues() > 0 {
        let t = Instant::now();
        assert_eq!(m.status("b").unwrap().state, VmState::Running);
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    flood.await.unwrap();
    eprintln!("slowest status of another VM during the flood: {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "status of another VM took {slowest:?}");
    let events = m.tail(Some("a"), before, 100_000).unwrap().events;
    eprintln!("{} transitions for 100000 reboots", events.len());
    assert!(events.len() < 1000, "{} transitions for one flood", events.len());
    let rebooted: u64 = events
        .iter()
        .map(|e| match e.reason.strip_prefix("the guest rebooted") {
            Some("") => 1,
            Some(n) => n.trim().trim_end_matches(" times").parse::<u64>().unwrap(),
            None => panic!("{e:?}"),
        })
        .sum();
    assert_eq!(rebooted, 100_000, "every reboot is counted once");
    assert_eq!(m.state("a").unwrap(), VmState::Running);
}

#[tokio::test]
async fn tail_and_follow_take_what_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    for i in 0..100 {
        let id = format!("vm-{i}");
        m.create(spec(&id)).await.unwrap();
        m.start(&id).await.unwrap();
    }
    let total = m.last_seq();
    assert_eq!(total, 500, "a create and four transitions each");
    let page = m.tail(None, 10, 5).unwrap();
    assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![11, 12, 13, 14, 15]);
    assert_eq!(page.next_seq, 15);
    let end = m.tail(None, 498, 5).unwrap();
    assert_eq!((end.events.len(), end.next_seq), (2, 500));
    let one = m.tail(Some("vm-7"), 0, 2).unwrap();
    assert_eq!(one.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![36, 37]);
    assert_eq!(one.next_seq, 37);
    // A follower from the start holds a page at most, and still sees everything in order.
    let mut f = m.follow(None, Some(0)).unwrap();
    let mut seen = Vec::new();
    for _ in 0..total {
        seen.push(f.next().await.unwrap().seq);
        assert!(f.backlog_len() <= FOLLOW_PAGE, "backlog {}", f.backlog_len());
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_removed_vm_leaves_nothing_behind_and_offsets_follow_applied_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    m.create(spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    let g = gen_of(&d);
    m.vmm_event("a", report(g, Some(500), VmmEvent::GuestReboot { count: 1 })).await.unwrap();
    assert_eq!(file(dir.path(), "a")["event_offset"], 500);
    // A stale report changes nothing, its offset included.
    m.vmm_event("a", report(g + 7, Some(900), VmmEvent::GuestPanic)).await.unwrap();
    assert_eq!(m.state("a").unwrap(), VmState::Running);
    assert_eq!(file(dir.path(), "a")["event_offset"], 500);
    m.stop("a", None).await.unwrap();
    // Reports still queued when the VM goes.
    d.set_delay(Step::Release, Duration::from_millis(100));
    let m2 = m.clone();
    let remove = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        m2.remove("a").await
    });
    for _ in 0..5 {
        m.report("a", report(g, None, VmmEvent::GuestPanic));
    }
    remove.await.unwrap().unwrap();
    eventually("the queue gone", || m.report_queues() == 0).await;
    m.report("a", report(g, None, VmmEvent::GuestPanic));
    assert_eq!(m.report_queues(), 0, "no queue for a VM that does not exist");
    assert_eq!(d.calls(Step::Forget), 1, "the driver forgot the VM");
    assert!(!dir.path().join("a.json").exists());
}

#[tokio::test]
async fn numbering_resumes_far_above_after_a_missing_sequence_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    assert_eq!(m.last_seq(), 0, "an empty state dir starts at 0");
    m.create(spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    assert_eq!(m.tail(None, 0, 10).unwrap().events[0].seq, 1);
    let last = m.last_seq();
    drop(m);
    std::fs::remove_file(dir.path().join(SEQUENCE_FILE)).unwrap();
    let m = open(dir.path(), &d);
    assert_eq!(m.last_seq(), last + SEQ_RECOVERY_GAP, "a missing mark is an unreadable one");
    // A mark below a recorded number is not trusted either.
    m.stop("a", None).await.unwrap();
    let last = m.last_seq();
    drop(m);
    std::fs::write(dir.path().join(SEQUENCE_FILE), b"3\n").unwrap();
    let m = open(dir.path(), &d);
    assert_eq!(m.last_seq(), last + SEQ_RECOVERY_GAP);
}
