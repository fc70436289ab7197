//! The VM manager with a test driver: every legal transition, illegal ones refused, the
//! idempotency rules, persistence across a restart, state.json v1 migration and corrupt files,
//! and events (tail and follow with a cursor).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::driver::{Step, TestDriver};
use my_hypervisor_frontend::rpc::errors::{self, ApiError};
use my_hypervisor_frontend::vm::fsm::TRANSITIONS;
use my_hypervisor_frontend::vm::store::SEQUENCE_FILE;
use my_hypervisor_frontend::vm::{EventTo, Manager, ManagerConfig, VmError, VmSpec, VmState, VmmEvent, VmmReport};
use serde_json::{Value, json};

/// The JSON-RPC code a VM error is answered with.
trait Code {
    fn code(&self) -> i32;
}

impl Code for VmError {
    fn code(&self) -> i32 {
        ApiError::from(self.clone()).code()
    }
}

/// A report about the VM's current VMM (the last one the test driver spawned).
fn now(d: &TestDriver, event: VmmEvent) -> VmmReport {
    VmmReport { generation: d.generation.load(Ordering::SeqCst), offset: None, event }
}

fn spec(id: &str) -> VmSpec {
    serde_json::from_value(json!({
        "id": id, "vcpus": 1, "memory_mib": 256, "kernel": "/img/vmlinux",
        "disks": [{"path": "/img/root.raw"}], "vsock": true, "labels": {"n": id}
    }))
    .unwrap()
}

fn open(dir: &Path, driver: &Arc<TestDriver>) -> Manager {
    let cfg = ManagerConfig::new(dir, vec![PathBuf::from("/img")]);
    Manager::open(cfg, Some(Arc::clone(driver) as _)).expect("open manager")
}

fn setup() -> (tempfile::TempDir, Arc<TestDriver>, Manager) {
    let dir = tempfile::tempdir().unwrap();
    let driver = Arc::new(TestDriver::default());
    let m = open(dir.path(), &driver);
    (dir, driver, m)
}

fn pairs(m: &Manager) -> BTreeSet<(VmState, VmState)> {
    // The transitions between states: create's (from null) and removals left out.
    m.tail(None, 0, usize::MAX).unwrap().events.iter().filter_map(|e| Some((e.from?, e.to.state()?))).collect()
}

async fn wait_state(m: &Manager, id: &str, want: VmState) {
    let end = Instant::now() + Duration::from_secs(5);
    while m.state(id).unwrap() != want {
        assert!(Instant::now() < end, "{id} never reached {want}, is {}", m.state(id).unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn every_legal_transition_happens_through_the_manager() {
    let (_dir, d, m) = setup();
    m.create(spec("a")).await.unwrap();
    // Pending → Provisioning → Configured → Starting → Running
    assert_eq!(m.start("a").await, Ok(VmState::Running));
    assert_eq!(m.vmm_event("a", now(&d, VmmEvent::GuestReboot { count: 1 })).await, Ok(VmState::Running));
    // Running → Stopping → Stopped, then Stopped → Provisioning …
    assert_eq!(m.stop("a", None).await, Ok(VmState::Stopped));
    assert_eq!(m.start("a").await, Ok(VmState::Running));
    // Running → Failed (a crash), Failed → Provisioning (leftovers released first).
    let exited = VmmEvent::Exited { clean: false, detail: "signal 9".into() };
    assert_eq!(m.vmm_event("a", now(&d, exited)).await, Ok(VmState::Failed));
    let releases = d.calls(Step::Release);
    assert_eq!(m.start("a").await, Ok(VmState::Running));
    assert!(d.calls(Step::Release) > releases, "start from failed releases first");
    assert_eq!(m.vmm_event("a", now(&d, VmmEvent::GuestPanic)).await, Ok(VmState::Failed));
    // Failed → Stopping → Stopped: the panicked guest's VMM may still run; stop releases it.
    assert_eq!(m.stop("a", None).await, Ok(VmState::Stopped));
    assert_eq!(m.start("a").await, Ok(VmState::Running));
    // Running → Stopped: the guest shut itself down.
    let clean = VmmEvent::Exited { clean: true, detail: "exit status 0".into() };
    assert_eq!(m.vmm_event("a", now(&d, clean)).await, Ok(VmState::Stopped));
    // Provisioning → StartFailed, StartFailed → Provisioning, Configured → StartFailed,
    // Starting → StartFailed.
    for step in [Step::Prepare, Step::Spawn, Step::WaitRunning] {
        d.set_fail(step, true);
        let e = m.start("a").await.unwrap_err();
        assert_eq!(e.code(), errors::VMM_ERROR, "{e}");
        assert_eq!(m.state("a").unwrap(), VmState::StartFailed);
        d.set_fail(step, false);
    }
    // The same with a failing release: Provisioning/Configured/Starting → Failed.
    d.set_fail(Step::Release, true);
    for step in [Step::Prepare, Step::Spawn, Step::WaitRunning] {
        d.set_fail(Step::Release, false);
        let _ = m.start("a").await; // from failed: needs a release that works
        if m.state("a").unwrap() == VmState::Running {
            m.stop("a", None).await.unwrap();
        }
        d.set_fail(Step::Release, true);
        d.set_fail(step, true);
        assert!(m.start("a").await.is_err());
        assert_eq!(m.state("a").unwrap(), VmState::Failed, "{step:?}");
        d.set_fail(step, false);
    }
    d.set_fail(Step::Release, false);
    // Stopping → Failed.
    assert_eq!(m.start("a").await, Ok(VmState::Running));
    d.set_fail(Step::Stop, true);
    assert_eq!(m.stop("a", None).await.unwrap_err().code(), errors::VMM_ERROR);
    assert_eq!(m.state("a").unwrap(), VmState::Failed);
    d.set_fail(Step::Stop, false);
    // Starting → Stopping: stop while starting.
    d.hang_boot.store(true, Ordering::SeqCst);
    let m2 = m.clone();
    let start = tokio::spawn(async move { m2.start("a").await });
    wait_state(&m, "a", VmState::Starting).await;
    assert_eq!(m.stop("a", None).await, Ok(VmState::Stopped));
    assert_eq!(start.await.unwrap(), Ok(VmState::Stopped));
    d.hang_boot.store(false, Ordering::SeqCst);

    let want: BTreeSet<(VmState, VmState)> = TRANSITIONS.iter().map(|&(f, t, _)| (f, t)).collect();
    assert_eq!(pairs(&m), want, "every legal transition was recorded");
    // Every one is numbered in order, with a reason and a time.
    let events = m.tail(None, 0, usize::MAX).unwrap().events;
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert!(events.iter().all(|e| !e.reason.is_empty() && e.at.ends_with('Z')));
}

#[tokio::test]
async fn illegal_operations_are_refused_with_the_documented_codes() {
    let (_dir, d, m) = setup();
    m.create(spec("a")).await.unwrap();
    // Stop on a VM that never ran.
    assert_eq!(m.stop("a", None).await.unwrap_err().code(), errors::NOT_RUNNING);
    m.start("a").await.unwrap();
    // Remove while a VMM may be alive.
    let e = m.remove("a").await.unwrap_err();
    assert_eq!(e.code(), errors::ILLEGAL_TRANSITION, "{e}");
    assert!(e.to_string().contains("running"), "{e}");
    // A VMM event about a VM that is not running changes nothing.
    m.stop("a", None).await.unwrap();
    let before = m.last_seq();
    assert_eq!(m.vmm_event("a", now(&d, VmmEvent::GuestPanic)).await, Ok(VmState::Stopped));
    assert_eq!(m.last_seq(), before);
    // Unknown VMs.
    assert_eq!(m.start("nope").await.unwrap_err().code(), errors::NO_SUCH_VM);
    assert_eq!(m.status("nope").unwrap_err().code(), errors::NO_SUCH_VM);
    assert_eq!(m.remove("nope").await.unwrap_err().code(), errors::NO_SUCH_VM);
    assert_eq!(m.tail(Some("nope"), 0, 10).unwrap_err().code(), errors::NO_SUCH_VM);
    // Nothing was left half-applied.
    assert_eq!(m.state("a").unwrap(), VmState::Stopped);
    assert_eq!(d.calls(Step::Stop), 1);
}

#[tokio::test]
async fn idempotency_rules() {
    let (_dir, d, m) = setup();
    assert_eq!(m.create(spec("a")).await, Ok(VmState::Pending));
    // Identical spec: the existing VM. `agent` given explicitly as its default is identical.
    let mut same = spec("a");
    same.agent = Some(true);
    assert_eq!(m.create(same).await, Ok(VmState::Pending));
    let mut other = spec("a");
    other.vcpus = 2;
    assert_eq!(m.create(other).await.unwrap_err().code(), errors::ALREADY_EXISTS);

    assert_eq!(m.start("a").await, Ok(VmState::Running));
    let (prepares, seq) = (d.calls(Step::Prepare), m.last_seq());
    assert_eq!(m.start("a").await, Ok(VmState::Running), "start on running is a no-op");
    assert_eq!((d.calls(Step::Prepare), m.last_seq()), (prepares, seq));
    assert_eq!(m.create(spec("a")).await, Ok(VmState::Running));

    // Concurrent stops join one operation.
    d.set_delay(Step::Stop, Duration::from_millis(200));
    let stops: Vec<_> = (0..8)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.stop("a", Some(Duration::from_secs(5))).await })
        })
        .collect();
    for s in stops {
        assert_eq!(s.await.unwrap(), Ok(VmState::Stopped));
    }
    assert_eq!(d.calls(Step::Stop), 1, "one stop for eight callers");
    let seq = m.last_seq();
    assert_eq!(m.stop("a", None).await, Ok(VmState::Stopped), "stop on stopped is a no-op");
    assert_eq!((d.calls(Step::Stop), m.last_seq()), (1, seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_vm_is_serialized_and_different_vms_run_in_parallel() {
    let (_dir, d, m) = setup();
    d.set_delay(Step::Prepare, Duration::from_millis(150));
    for id in ["a", "b", "c"] {
        m.create(spec(id)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for id in ["a", "b", "c"] {
        for _ in 0..3 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move { m.start(id).await }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(VmState::Running));
    }
    assert_eq!(d.calls(Step::Prepare), 3, "one start per VM; the others found it running");
    assert_eq!(d.max_per_vm.load(Ordering::SeqCst), 1, "never two driver calls on one VM at once");
    assert!(d.max_total.load(Ordering::SeqCst) >= 2, "different VMs ran in parallel");
}

#[tokio::test]
async fn history_and_sequence_survive_a_restart_and_removal_never_reuses_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    m.create(spec("a")).await.unwrap();
    m.create(spec("b")).await.unwrap();
    m.start("a").await.unwrap();
    m.start("b").await.unwrap();
    m.stop("b", None).await.unwrap();
    let before = m.tail(None, 0, usize::MAX).unwrap();
    let status_a = m.status("a").unwrap();
    let last = m.last_seq();
    let on_disk: u64 = std::fs::read_to_string(dir.path().join(SEQUENCE_FILE)).unwrap().trim().parse().unwrap();
    assert!(on_disk >= last, "the high-water mark {on_disk} is persisted before {last} is used");
    drop(m);

    // A restart reloads everything and touches no VM.
    let d2 = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d2);
    assert_eq!(m.tail(None, 0, usize::MAX).unwrap().events, before.events);
    assert_eq!(m.status("a").unwrap(), status_a);
    assert_eq!(m.state("b").unwrap(), VmState::Stopped);
    assert!(d2.calls.lock().unwrap().is_empty(), "no driver call at load");

    // Remove b (its history goes with it) and restart: numbers keep growing.
    m.remove("b").await.unwrap();
    assert!(!dir.path().join("b.json").exists());
    drop(m);
    let m = open(dir.path(), &d2);
    assert_eq!(m.status("b").unwrap_err().code(), errors::NO_SUCH_VM);
    m.create(spec("b")).await.unwrap();
    m.start("b").await.unwrap();
    let first_new = m.tail(Some("b"), 0, 1).unwrap().events[0].seq;
    assert!(first_new > last, "{first_new} must be above {last}");
}

#[tokio::test]
async fn the_ring_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let mut cfg = ManagerConfig::new(dir.path(), vec![PathBuf::from("/img")]);
    cfg.ring_capacity = 8;
    let m = Manager::open(cfg, Some(Arc::clone(&d) as _)).unwrap();
    m.create(spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    for _ in 0..10 {
        m.vmm_event("a", now(&d, VmmEvent::GuestReboot { count: 1 })).await.unwrap();
    }
    let events = m.tail(Some("a"), 0, 1000).unwrap().events;
    assert_eq!(events.len(), 8);
    assert_eq!(events.last().unwrap().seq, m.last_seq());
}

#[tokio::test]
async fn tail_with_a_cursor() {
    let (_dir, _d, m) = setup();
    m.create(spec("a")).await.unwrap(); // 1
    m.create(spec("b")).await.unwrap(); // 2
    m.start("a").await.unwrap(); // 3-6
    m.start("b").await.unwrap(); // 7-10
    m.stop("a", None).await.unwrap(); // 11-12
    let all = m.tail(None, 0, 100).unwrap();
    assert_eq!(all.events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    assert_eq!((all.events[0].from, all.events[0].to), (None, EventTo::State(VmState::Pending)));
    assert_eq!(all.next_seq, 12);
    assert!(!all.truncated);
    let page = m.tail(None, 3, 4).unwrap();
    assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5, 6, 7]);
    assert_eq!(page.next_seq, 7);
    let rest = m.tail(None, page.next_seq, 100).unwrap();
    assert_eq!(rest.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![8, 9, 10, 11, 12]);
    let a = m.tail(Some("a"), 2, 100).unwrap();
    assert_eq!(a.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5, 6, 11, 12]);
    assert!(a.events.iter().all(|e| e.vm_id == "a"));
    let none = m.tail(None, 12, 100).unwrap();
    assert!(none.events.is_empty());
    assert_eq!(none.next_seq, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follow_from_a_tail_cursor_has_no_gap_or_duplicate() {
    let (_dir, _d, m) = setup();
    let ids: Vec<String> = (0..4).map(|i| format!("vm-{i}")).collect();
    for id in &ids {
        m.create(spec(id)).await.unwrap();
    }
    // Producers run the whole time the consumer tails and then follows.
    let producers: Vec<_> = ids
        .iter()
        .map(|id| {
            let (m, id) = (m.clone(), id.clone());
            tokio::spawn(async move {
                for _ in 0..15 {
                    m.start(&id).await.unwrap();
                    m.stop(&id, None).await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let tail = m.tail(None, 0, 1000).unwrap();
    let mut seen: Vec<u64> = tail.events.iter().map(|e| e.seq).collect();
    let mut follower = m.follow(None, Some(tail.next_seq)).unwrap();
    let total = 4 * 15 * 6;
    while seen.len() < total {
        let e = tokio::time::timeout(Duration::from_secs(10), follower.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        seen.push(e.seq);
    }
    for p in producers {
        p.await.unwrap();
    }
    assert_eq!(seen, (1..=total as u64).collect::<Vec<_>>(), "every event once, in order");

    // Following one VM from an old cursor replays its history, then goes live.
    let mut one = m.follow(Some("vm-1".into()), Some(0)).unwrap();
    let hist = m.tail(Some("vm-1"), 0, 1000).unwrap().events;
    for h in &hist {
        assert_eq!(&one.next().await.unwrap(), h);
    }
    m.start("vm-1").await.unwrap();
    let live = one.next().await.unwrap();
    assert_eq!(
        (live.vm_id.as_str(), live.from, live.to),
        ("vm-1", Some(VmState::Stopped), EventTo::State(VmState::Provisioning))
    );
    assert!(m.follow(Some("nope".into()), None).is_err());
}

#[tokio::test]
async fn a_v1_state_file_is_migrated_to_v2() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/state-v1.json");
    std::fs::copy(fixture, dir.path().join("legacy-1.json")).unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    let st = m.status("legacy-1").unwrap();
    assert_eq!(st.state, VmState::Stopped);
    let spec = st.spec.expect("spec");
    assert_eq!((spec.vcpus, spec.memory_mib, spec.kernel.as_deref()), (2, 512, Some("/img/vmlinux")));
    assert_eq!(spec.agent, Some(true), "v1 had no agent flag: it defaults to vsock");
    assert_eq!(spec.nets[0].mac.as_deref(), Some("52:54:00:aa:bb:01"));
    assert_eq!(spec.labels["tenant"], "old");
    let events = m.tail(Some("legacy-1"), 0, 10).unwrap().events;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].seq, events[0].from, events[0].to),
        (41, Some(VmState::Stopping), EventTo::State(VmState::Stopped))
    );
    assert_eq!(events[0].at, "2024-11-02T09:20:00.000Z");

    // Written back as v2.
    let v2: Value = serde_json::from_slice(&std::fs::read(dir.path().join("legacy-1.json")).unwrap()).unwrap();
    assert_eq!(v2["schema_version"], 2);
    assert_eq!(v2["state"], "stopped");
    assert_eq!(v2["spec"]["id"], "legacy-1");
    assert_eq!(v2["history"][0]["seq"], 41);
    // Numbering continues above what the file held, and the VM works.
    m.start("legacy-1").await.unwrap();
    assert!(m.last_seq() > 41);
    drop(m);
    let m = open(dir.path(), &d);
    assert_eq!(m.state("legacy-1").unwrap(), VmState::Running);
}

#[tokio::test]
async fn a_corrupt_state_file_gives_a_failed_vm_and_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.json"), b"{\"schema_version\": 2, \"vm_id\": \"bad\", \"sta").unwrap();
    std::fs::write(dir.path().join("future.json"), br#"{"schema_version": 9}"#).unwrap();
    std::fs::write(dir.path().join(SEQUENCE_FILE), b"7\n").unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    m.create(spec("good")).await.unwrap();
    for (id, why) in [("bad", "not valid JSON"), ("future", "schema_version 9")] {
        let st = m.status(id).unwrap();
        assert_eq!(st.state, VmState::Failed);
        assert_eq!(st.spec, None);
        let err = st.last_error.unwrap();
        assert!(err.contains("unreadable") && err.contains(why) && err.contains("corrupt-"), "{err}");
    }
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().any(|n| n.starts_with("bad.json.corrupt-")), "{names:?}");
    let aside = names.iter().find(|n| n.starts_with("bad.json.corrupt-")).unwrap();
    assert!(std::fs::read(dir.path().join(aside)).unwrap().ends_with(b"\"sta"), "kept as it was");

    // It stays failed across another restart, cannot start, and remove releases first.
    drop(m);
    let m = open(dir.path(), &d);
    assert_eq!(m.state("bad").unwrap(), VmState::Failed);
    assert_eq!(m.state("good").unwrap(), VmState::Pending);
    assert_eq!(m.start("bad").await.unwrap_err().code(), errors::INVALID_SPEC);
    let releases = d.calls(Step::Release);
    m.remove("bad").await.unwrap();
    assert_eq!(d.calls(Step::Release), releases + 1);
    assert_eq!(m.status("bad").unwrap_err().code(), errors::NO_SUCH_VM);
    assert!(dir.path().join(aside).exists(), "the aside copy stays for inspection");
}

#[tokio::test]
async fn an_unreadable_sequence_file_never_lets_numbers_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(TestDriver::default());
    let m = open(dir.path(), &d);
    m.create(spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    let last = m.last_seq();
    drop(m);
    std::fs::write(dir.path().join(SEQUENCE_FILE), b"garbage").unwrap();
    let m = open(dir.path(), &d);
    m.stop("a", None).await.unwrap();
    assert!(m.last_seq() > last + 1_000_000);
}

#[tokio::test]
async fn start_and_stop_without_a_driver_are_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manager::open(ManagerConfig::new(dir.path(), vec![PathBuf::from("/img")]), None).unwrap();
    m.create(spec("a")).await.unwrap();
    assert_eq!(m.start("a").await.unwrap_err().code(), errors::NOT_READY);
    assert_eq!(m.stop("a", None).await.unwrap_err().code(), errors::NOT_READY);
    m.remove("a").await.unwrap();
}

#[tokio::test]
async fn the_number_of_vms_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ManagerConfig::new(dir.path(), vec![PathBuf::from("/img")]);
    cfg.max_vms = 3;
    let m = Manager::open(cfg, None).unwrap();
    for id in ["a", "b", "c"] {
        m.create(spec(id)).await.unwrap();
    }
    let e = m.create(spec("d")).await.unwrap_err();
    assert_eq!(e.code(), errors::TOO_MANY_VMS, "{e:?}");
    assert_eq!(ApiError::from(e.clone()).data(), Some(json!({"max": 3})), "{e:?}");
    assert_eq!(m.create(spec("a")).await, Ok(VmState::Pending), "an existing VM is still found");
    m.remove("c").await.unwrap();
    assert_eq!(m.create(spec("d")).await, Ok(VmState::Pending), "room again after a remove");
}

#[tokio::test]
async fn exec_answers_no_agent_not_running_or_unreachable_in_that_order() {
    let (_dir, _driver, m) = setup();
    let req = || my_hypervisor_frontend::exec::ExecRequest::new(["true"]);
    let mut plain = spec("plain");
    plain.agent = Some(false);
    m.create(plain).await.unwrap();
    m.create(spec("agent")).await.unwrap();
    let e = m.exec("nope", req(), None).await.unwrap_err();
    assert_eq!(e.code(), errors::NO_SUCH_VM, "{e}");
    // Without an agent the VM's state does not matter.
    let e = m.exec("plain", req(), None).await.unwrap_err();
    assert_eq!(e.code(), errors::NO_AGENT, "{e}");
    let e = m.exec("agent", req(), None).await.unwrap_err();
    assert_eq!(e.code(), errors::NOT_RUNNING, "{e}");
    assert_eq!(m.start("agent").await.unwrap(), VmState::Running);
    // The test driver has no vsock: the agent cannot be reached.
    let e = m.exec("agent", req(), None).await.unwrap_err();
    assert_eq!(e.code(), errors::AGENT_UNREACHABLE, "{e}");
    assert!(e.to_string().contains("no vsock stream"), "{e}");
}
