//! The one integration-test binary (one link instead of many): boots real brokers
//! and drives them with real clients.

/// Instantiates each named `fn name(kind: Js)` of the invoking module as the
/// tests `reference::name` (nats-server -js) and `perch::name`.
macro_rules! js_tests {
    ($($name:ident),* $(,)?) => {
        mod reference {
            $(
                #[test]
                fn $name() {
                    super::$name(crate::support::Js::Reference)
                }
            )*
        }
        mod perch {
            $(
                #[test]
                fn $name() {
                    super::$name(crate::support::Js::Perch)
                }
            )*
        }
    };
}

mod auth;
mod auth_fuzz;
mod cli;
mod client;
mod crash;
mod device;
mod differential;
mod differential_js;
mod doctor;
mod interest_model;
mod jetstream;
mod limits;
mod monitoring;
mod shards;
mod store_cli;
mod store_faults;
mod support;
mod systemd;
mod tls;
