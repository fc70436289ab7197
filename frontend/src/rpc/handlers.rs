//! What each method does, with its params and result types ([`super::params`],
//! [`super::results`]); [`super::api::API`] serves them.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use jsonrpsee::PendingSubscriptionSink;
use jsonrpsee::core::SubscriptionResult;
use jsonrpsee::types::ErrorObjectOwned;

use super::api::{Answer, EVENT_NOTIFICATION, Handler, Subscription, invalid_field};
use super::params::*;
use super::results::*;
use super::schema::{OpenRpcDocument, openrpc_document};
use crate::vm::driver::DEFAULT_STOP_GRACE;
use crate::vm::query::parse_selector;
use crate::vm::{ListFilter, Manager, StopOptions, VmSpec};

pub struct Create;

impl Handler for Create {
    type Params = VmSpec;
    type Result = VmStateResult;
    async fn call(_: &'static str, vms: Arc<Manager>, spec: VmSpec) -> Answer<VmStateResult> {
        let vm_id = spec.id.clone();
        Ok(VmStateResult { state: vms.create(spec).await?, vm_id })
    }
}

pub struct Start;

impl Handler for Start {
    type Params = VmIdParams;
    type Result = VmStateResult;
    async fn call(_: &'static str, vms: Arc<Manager>, p: VmIdParams) -> Answer<VmStateResult> {
        let state = vms.start(p.vm_id.as_str()).await?;
        Ok(VmStateResult { vm_id: p.vm_id.into_string(), state })
    }
}

pub struct Stop;

impl Handler for Stop {
    type Params = StopParams;
    type Result = VmStateResult;
    async fn call(method: &'static str, vms: Arc<Manager>, p: StopParams) -> Answer<VmStateResult> {
        let grace = match p.timeout_secs {
            Some(t) if t > MAX_STOP_TIMEOUT_SECS => {
                return Err(invalid_field(method, "timeout_secs", &format!("must be at most {MAX_STOP_TIMEOUT_SECS}")));
            }
            t => t.map(Duration::from_secs),
        };
        let opts = StopOptions { grace: grace.unwrap_or(DEFAULT_STOP_GRACE), force: p.force.unwrap_or(false) };
        let state = vms.stop_with(p.vm_id.as_str(), opts).await?;
        Ok(VmStateResult { vm_id: p.vm_id.into_string(), state })
    }
}

pub struct Remove;

impl Handler for Remove {
    type Params = VmIdParams;
    type Result = RemovedResult;
    async fn call(_: &'static str, vms: Arc<Manager>, p: VmIdParams) -> Answer<RemovedResult> {
        vms.remove(p.vm_id.as_str()).await?;
        Ok(RemovedResult { vm_id: p.vm_id.into_string(), removed: true })
    }
}

pub struct Status;

impl Handler for Status {
    type Params = StatusParams;
    type Result = StatusResult;
    async fn call(_: &'static str, vms: Arc<Manager>, p: StatusParams) -> Answer<StatusResult> {
        let id = p.vm_id.as_str();
        let mut status = StatusResult::from(vms.status(id)?);
        status.sandbox = match vms.sandbox(id).await {
            Ok(view) => view.map(|v| SandboxResult::new(Ok(v), p.verbose.unwrap_or(false))),
            Err(e @ crate::vm::VmError::NoSuchVm { .. }) => return Err(e.into()),
            Err(e) => Some(SandboxResult::new(Err(e.to_string()), false)),
        };
        Ok(status)
    }
}

pub struct List;

impl Handler for List {
    type Params = ListParams;
    type Result = ListResult;
    async fn call(method: &'static str, vms: Arc<Manager>, p: ListParams) -> Answer<ListResult> {
        let limit = p.limit.unwrap_or(DEFAULT_LIST_LIMIT as u32) as usize;
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(invalid_field(method, "limit", &format!("must be between 1 and {MAX_LIST_LIMIT}")));
        }
        let labels = match p.labels.as_deref().map(parse_selector).transpose() {
            Ok(l) => l.unwrap_or_default(),
            Err(why) => return Err(invalid_field(method, "labels", &format!("is not a selector: {why}"))),
        };
        let filter = ListFilter { state: p.state, labels };
        Ok(vms.list_page(&filter, p.cursor.as_ref().map(VmId::as_str), limit)?.into())
    }
}

pub struct EventsTail;

impl Handler for EventsTail {
    type Params = EventsTailParams;
    type Result = TailResult;
    async fn call(method: &'static str, vms: Arc<Manager>, p: EventsTailParams) -> Answer<TailResult> {
        let limit = p.limit.unwrap_or(DEFAULT_TAIL_LIMIT);
        if !(1..=MAX_TAIL_LIMIT).contains(&limit) {
            return Err(invalid_field(method, "limit", &format!("must be between 1 and {MAX_TAIL_LIMIT}")));
        }
        let id = p.vm_id.as_ref().map(VmId::as_str);
        Ok(vms.tail(id, p.since_seq.unwrap_or(0), limit as usize)?.into())
    }
}

/// `compute.vm.events.follow`: replays the history after the cursor, then streams live
/// transitions, each exactly once, until the client unfollows or goes away.
pub struct EventsFollow;

impl Subscription for EventsFollow {
    type Params = EventsFollowParams;
    type Result = SubscriptionId;
    const UNSUBSCRIBE: &'static str = "compute.vm.events.unfollow";
    const NOTIFICATION: &'static str = EVENT_NOTIFICATION;

    async fn run(
        _: &'static str,
        vms: Arc<Manager>,
        p: EventsFollowParams,
        pending: PendingSubscriptionSink,
    ) -> SubscriptionResult {
        let mut follower = match vms.follow(p.vm_id.map(VmId::into_string), p.since_seq) {
            Ok(f) => f,
            Err(e) => {
                pending.reject(ErrorObjectOwned::from(e)).await;
                return Ok(());
            }
        };
        let sink = pending.accept().await?;
        loop {
            let event = tokio::select! {
                e = follower.next() => e,
                () = sink.closed() => None,
            };
            let Some(event) = event else {
                // Ended with an error notification when the follower fell off the history.
                return match follower.truncated() {
                    Some(oldest) => Err(format!(
                        "events after seq {} have left the history (oldest_seq {oldest}); list again and follow from its seq",
                        follower.cursor()
                    )
                    .into()),
                    None => Ok(()),
                };
            };
            sink.send(serde_json::value::to_raw_value(&EventResult::from(event))?).await?;
        }
    }
}

pub struct Exec;

impl Handler for Exec {
    type Params = ExecParams;
    type Result = ExecResult;
    async fn call(method: &'static str, vms: Arc<Manager>, p: ExecParams) -> Answer<ExecResult> {
        super::exec::call(method, vms, p).await
    }
}

pub struct Discover;

impl Handler for Discover {
    type Params = Empty;
    type Result = OpenRpcDocument;
    async fn call(_: &'static str, _: Arc<Manager>, _: Empty) -> Answer<OpenRpcDocument> {
        // The document never changes while the process runs.
        static DOCUMENT: OnceLock<OpenRpcDocument> = OnceLock::new();
        Ok(DOCUMENT.get_or_init(openrpc_document).clone())
    }
}
