//! Agent round trips per CRI call: vesseld counts every agent call by RPC in
//! `/metrics` (`vessel_agent_call_duration_seconds_count`); the harness reads it
//! before and after a CRI call and keeps the difference.

use std::collections::BTreeMap;

use anyhow::Context as _;

const FAMILY: &str = "vessel_agent_call_duration_seconds_count{";

/// Agent calls so far, by RPC (every result summed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calls(pub BTreeMap<String, u64>);

impl Calls {
    /// The agent-call counters of an OpenMetrics text; other lines are ignored.
    pub fn parse(text: &str) -> Calls {
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(FAMILY) else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let Some(rpc) = labels
                .split(',')
                .find_map(|l| l.strip_prefix("rpc=\""))
                .and_then(|v| v.strip_suffix('"'))
            else {
                continue;
            };
            // Counts print as integers; a float form is tolerated.
            let Ok(n) = value.trim().parse::<f64>() else {
                continue;
            };
            *calls.entry(rpc.to_owned()).or_insert(0) += n as u64;
        }
        Calls(calls)
    }

    /// Calls made between `earlier` and `self`; RPCs with none are left out.
    pub fn since(&self, earlier: &Calls) -> Calls {
        Calls(
            self.0
                .iter()
                .filter_map(|(rpc, &n)| {
                    let d = n.saturating_sub(earlier.0.get(rpc).copied().unwrap_or(0));
                    (d > 0).then(|| (rpc.clone(), d))
                })
                .collect(),
        )
    }

    /// These calls without `rpc`'s.
    pub fn without(mut self, rpc: &str) -> Calls {
        self.0.remove(rpc);
        self
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// "CreateContainer 1, Health 2".
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(rpc, n)| format!("{rpc} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The counters from vesseld's `/metrics` at `addr`.
pub async fn fetch(addr: &str) -> anyhow::Result<Calls> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET http://{addr}/metrics"))?
        .text()
        .await?;
    Ok(Calls::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE vessel_agent_call_duration_seconds histogram\n\
        vessel_agent_call_duration_seconds_sum{rpc=\"Health\",result=\"ok\"} 0.5\n\
        vessel_agent_call_duration_seconds_count{rpc=\"Health\",result=\"ok\"} 3\n\
        vessel_agent_call_duration_seconds_count{rpc=\"Health\",result=\"error\"} 2\n\
        vessel_agent_call_duration_seconds_count{rpc=\"ExecProcess\",result=\"ok\"} 1\n\
        vessel_agent_call_duration_seconds_bucket{rpc=\"Health\",result=\"ok\",le=\"0.001\"} 1\n\
        vessel_cri_call_duration_seconds_count{method=\"x\",code=\"Ok\"} 9\n\
        vessel_agent_call_duration_seconds_count{result=\"ok\"} 4\n\
        vessel_agent_call_duration_seconds_count{rpc=\"Bad\",result=\"ok\"} many\n\
        # EOF\n";

    #[test]
    fn parses_counts_by_rpc_summing_results() {
        let c = Calls::parse(TEXT);
        let want: BTreeMap<String, u64> = [("ExecProcess".to_owned(), 1), ("Health".to_owned(), 5)]
            .into_iter()
            .collect();
        assert_eq!(c.0, want);
        assert_eq!(c.total(), 6);
        assert_eq!(c.describe(), "ExecProcess 1, Health 5");
    }

    #[test]
    fn difference_keeps_only_rpcs_that_were_called() {
        let before = Calls::parse(TEXT);
        let after = Calls::parse(&TEXT.replace("} 3\n", "} 4\n").replace(
            "# EOF",
            "vessel_agent_call_duration_seconds_count{rpc=\"WaitProcess\",result=\"ok\"} 2\n# EOF",
        ));
        let d = after.since(&before);
        assert_eq!(d.describe(), "Health 1, WaitProcess 2");
        assert_eq!(d.total(), 3);
        assert_eq!(d.clone().without("Health").describe(), "WaitProcess 2");
        assert_eq!(d.without("Nothing").total(), 3);
        assert_eq!(before.since(&after).total(), 0);
        assert_eq!(Calls::parse("").total(), 0);
    }
}
