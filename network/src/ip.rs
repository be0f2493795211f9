//! An IP address with a prefix length ("10.88.0.5/16"), the CIDR form CNI uses.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address plus prefix length. Host bits are kept (CNI's `address` is an
/// interface address, not a network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpPrefix {
    /// Builds one, checking the prefix length against the address family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<IpPrefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix_len <= max).then_some(IpPrefix { addr, prefix_len })
    }

    /// The default route of the address's family (0.0.0.0/0 or ::/0).
    pub fn is_default(&self) -> bool {
        self.prefix_len == 0
    }
}

/// Why a string is not an address/prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?}")]
pub struct ParseIpPrefixError(String);

impl FromStr for IpPrefix {
    type Err = ParseIpPrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIpPrefixError(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let len: u8 = len.parse().map_err(|_| err())?;
        IpPrefix::new(addr, len).ok_or_else(err)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let p: IpPrefix = "10.88.0.5/16".parse().unwrap();
        assert_eq!(p.addr, "10.88.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(p.prefix_len, 16);
        assert_eq!(p.to_string(), "10.88.0.5/16");
        let v6: IpPrefix = "fd00::5/64".parse().unwrap();
        assert_eq!(v6.to_string(), "fd00::5/64");
        assert!("0.0.0.0/0".parse::<IpPrefix>().unwrap().is_default());
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::/129",
            "x/8",
            "10.0.0.1/-1",
        ] {
            assert!(bad.parse::<IpPrefix>().is_err(), "{bad}");
        }
    }
}
