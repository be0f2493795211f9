//! Fuzzing of what vesseld reads from CNI plugins: the chain's result (parsed, then
//! turned into the guest's network plan) and a failed plugin's error output. Run long
//! with `VESSEL_FUZZ_SECS=600 cargo test -p vessel-network --lib fuzz -- --nocapture
//! --test-threads=1` (engine and knobs: the `vessel-fuzz` crate).

use vessel_fuzz::fuzz;

use super::{CniResult, PluginError};
use crate::ip::IpPrefix;
use crate::plan::GuestNetworkPlan;
use crate::tap::{LinkInfo, LinkRoute};

fn veth() -> LinkInfo {
    LinkInfo {
        name: "eth0".into(),
        ifindex: 3,
        mac: "0a:58:0a:58:00:07".into(),
        mtu: 1500,
        addresses: vec!["10.88.0.7/16".parse().unwrap()],
        routes: vec![LinkRoute {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("10.88.0.1".parse().unwrap()),
        }],
    }
}

fn valid_prefix(p: &IpPrefix) -> bool {
    p.prefix_len <= if p.addr.is_ipv4() { 32 } else { 128 }
}

#[test]
fn fuzz_cni_results() {
    let seeds: Vec<Vec<u8>> = vec![
        br#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"aa:aa:aa:aa:aa:01"},{"name":"veth1","mac":"aa:aa:aa:aa:aa:02"},{"name":"eth0","mac":"aa:aa:aa:aa:aa:03","mtu":1450,"sandbox":"/run/vessel/netns/p"}],"ips":[{"address":"10.88.0.7/16","gateway":"10.88.0.1","interface":2}],"routes":[{"dst":"0.0.0.0/0"},{"dst":"192.168.0.0/24","gw":"10.88.0.254"}],"dns":{"nameservers":["10.96.0.10"],"domain":"cluster.local","search":["svc.local"],"options":["ndots:5"]}}"#.to_vec(),
        br#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"version":"4","address":"10.1.2.3/24","gateway":"10.1.2.1","interface":0},{"version":"6","address":"fd00::3/64","interface":0}],"dns":{}}"#.to_vec(),
        br#"{"cniVersion":"0.3.1","ips":[{"address":"fd00::9/128","interface":4294967295}],"routes":[{"dst":"::/0","gw":"fd00::1"}]}"#.to_vec(),
        br#"{"cniVersion":"1.0.0","code":7,"msg":"failed to allocate","details":"range full"}"#.to_vec(),
    ];
    let veth = veth();
    let mut parsed = 0u64;
    fuzz("cni results", &seeds, |data| {
        // A failed plugin's output: always an error with a message, never a panic.
        let err = PluginError::from_output(data, data, "exit status: 1");
        assert!(!err.to_string().is_empty());
        // Invalid UTF-8 becomes U+FFFD (3 bytes) in the message, nothing more.
        assert!(
            err.msg.len() <= 3 * data.len() + 64,
            "a message out of proportion to the output"
        );

        let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let Ok(result) = CniResult::parse(&value) else {
            return;
        };
        parsed += 1;
        // What parses prints as the same result (the cache stores and reloads it).
        let again = CniResult::parse(&serde_json::to_value(&result).unwrap())
            .expect("a parsed result parses again");
        assert_eq!(again, result);
        if let Some(i) = result.sandbox_interface("eth0") {
            assert!(i < result.interfaces.len());
        }

        // The plan the agent gets: one NIC, the veth's identity, addresses and routes
        // valid for their family, nothing the result did not hold.
        let plan = GuestNetworkPlan::new(&result, &veth, "eth0");
        assert_eq!(plan.interfaces.len(), 1);
        let nic = &plan.interfaces[0];
        assert_eq!((nic.mac.as_str(), nic.mtu), (veth.mac.as_str(), veth.mtu));
        assert!(nic.addresses.iter().all(valid_prefix));
        assert!(nic.addresses.len() <= result.ips.len().max(veth.addresses.len()));
        assert!(plan.routes.len() <= result.routes.len().max(veth.routes.len()));
        assert!(plan
            .routes
            .iter()
            .all(|r| r.device == "eth0" && valid_prefix(&r.dst)));
        assert_eq!(plan.dns.servers, result.dns.nameservers);
        let mut seen = std::collections::HashSet::new();
        assert!(
            plan.dns.searches.iter().all(|s| seen.insert(s)),
            "searches are unique"
        );
    });
    eprintln!("fuzz cni results: {parsed} inputs parsed as results");
}
