//! The pod VM: hypervisor driver, helpers, guest assets, agent client
