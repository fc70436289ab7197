//! The paged, filtered `compute.vm.list`: a state filter, a label selector (`k=v,k2=v2`, all
//! must match), pages after a cursor (the last VM id of the previous page) that stay under a
//! byte budget, and the sequence number to follow events from.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::driver::SandboxView;
use super::error::VmError;
use super::fsm::VmState;
use super::manager::{Manager, VmSummary};

/// Default and largest number of VMs on one page.
pub const DEFAULT_LIST_LIMIT: usize = 500;
pub const MAX_LIST_LIMIT: usize = 1000;
/// A page is cut before its VMs' JSON would pass this many bytes, so a page stays well under
/// the default response limit (1 MiB) whatever the labels hold.
pub const LIST_PAGE_BYTES: usize = 512 * 1024;
/// Longest label selector, in bytes: room for its most terms at their longest.
pub const MAX_SELECTOR_BYTES: usize = 16384;
/// Most terms in a label selector (a VM has at most this many labels anyway).
pub const MAX_SELECTOR_TERMS: usize = super::spec::MAX_LABELS;

/// Which VMs a list shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub state: Option<VmState>,
    /// Every one of these labels must be on the VM with this value.
    pub labels: BTreeMap<String, String>,
}

impl ListFilter {
    fn matches(&self, state: VmState, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.state.is_none_or(|s| s == state)
            && self.labels.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    }
}

/// Parses a label selector: `k=v` terms separated by commas, each key at most once.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    if text.len() > MAX_SELECTOR_BYTES {
        return Err(format!("longer than {MAX_SELECTOR_BYTES} bytes"));
    }
    if text.is_empty() {
        return Ok(out);
    }
    for term in text.split(',') {
        let Some((k, v)) = term.split_once('=') else {
            return Err(format!("term {term:?} is not key=value"));
        };
        if k.is_empty() {
            return Err(format!("term {term:?} has an empty key"));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("key {k:?} is given twice"));
        }
        if out.len() > MAX_SELECTOR_TERMS {
            return Err(format!("at most {MAX_SELECTOR_TERMS} terms"));
        }
    }
    Ok(out)
}

/// One page of `compute.vm.list`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub vms: Vec<VmSummary>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
    /// The last sequence number handed out when this page was taken: every transition up
    /// to it is reflected in the page, so following from it loses nothing.
    pub seq: u64,
}

impl Manager {
    /// The sandbox of the VM's VMM while one may be alive (starting, running, stopping, or
    /// failed with a pid); `None` otherwise.
    pub async fn sandbox(&self, vm_id: &str) -> Result<Option<SandboxView>, VmError> {
        let (state, pid) = {
            let r = self.records();
            let e = r.get(vm_id).ok_or_else(|| VmError::no_such_vm(vm_id))?;
            (e.rec.state, e.rec.pid)
        };
        let live = matches!(state, VmState::Starting | VmState::Running | VmState::Stopping)
            || (state == VmState::Failed && pid.is_some());
        if !live {
            return Ok(None);
        }
        let driver = self.driver("compute.vm.status")?;
        driver
            .sandbox(vm_id)
            .await
            .map(Some)
            .map_err(|e| VmError::Vmm { vm_id: vm_id.to_string(), detail: e.to_string() })
    }

    /// At most `limit` VMs matching `filter` whose id sorts after `cursor`, in id order, cut
    /// early so their JSON stays under [`LIST_PAGE_BYTES`]. Read under the records lock that
    /// orders transitions, so `seq` and the states agree.
    pub fn list_page(&self, filter: &ListFilter, cursor: Option<&str>, limit: usize) -> Result<ListPage, VmError> {
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let r = self.records();
        let seq = r.last_seq;
        let start = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let mut vms = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for (id, e) in r.range(start) {
            let labels = e.rec.spec.as_ref().map(|s| &s.labels);
            if !filter.matches(e.rec.state, labels) {
                continue;
            }
            let summary =
                VmSummary { vm_id: id.to_string(), state: e.rec.state, labels: labels.cloned().unwrap_or_default() };
            let size = serde_json::to_vec(&summary).map_or(0, |v| v.len()) + 1;
            if vms.len() == limit || (!vms.is_empty() && bytes + size > LIST_PAGE_BYTES) {
                more = true;
                break;
            }
            bytes += size;
            vms.push(summary);
        }
        let next_cursor = if more { vms.last().map(|s| s.vm_id.clone()) } else { None };
        Ok(ListPage { vms, next_cursor, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_or_say_why_not() {
        let s = parse_selector("tenant=a,tier=web").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s["tier"], "web");
        assert_eq!(parse_selector("").unwrap().len(), 0);
        assert_eq!(parse_selector("k=").unwrap()["k"], "");
        for bad in ["tenant", "=a", "a=1,a=2", "a=1,,b=2"] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_SELECTOR_TERMS).map(|i| format!("k{i}=v")).collect();
        assert!(parse_selector(&many.join(",")).is_err());
        assert!(parse_selector(&format!("k={}", "v".repeat(MAX_SELECTOR_BYTES))).is_err());
    }

    #[test]
    fn filters_need_every_label() {
        let f = ListFilter { state: Some(VmState::Running), labels: parse_selector("a=1,b=2").unwrap() };
        let labels: BTreeMap<String, String> =
            [("a", "1"), ("b", "2"), ("c", "3")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(f.matches(VmState::Running, Some(&labels)));
        assert!(!f.matches(VmState::Stopped, Some(&labels)));
        let mut fewer = labels.clone();
        fewer.remove("b");
        assert!(!f.matches(VmState::Running, Some(&fewer)));
        assert!(!f.matches(VmState::Running, None));
    }
}
