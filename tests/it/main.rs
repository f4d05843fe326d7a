//! The one integration-test binary (one link instead of many): boots real brokers
//! and drives them with real clients.

/// THE SWITCH for perch's JetStream test variants (jetstream.rs, crash.rs,
/// differential_js.rs). Its input is the perch half of those suites; while perch
/// cannot serve JetStream it expands to nothing, so those tests do not exist
/// (rather than exist and be skipped or pass without running). The reference
/// half (nats-server -js) always runs.
///
/// To enable, once `perch serve --store-dir DIR` serves JetStream: change the
/// `=> {};` below to `=> { $($item)* };`.
macro_rules! perch_js_ready {
    ($($item:item)*) => { $($item)* };
}

/// Instantiates each named `fn name(kind: Js)` of the invoking module as the
/// tests `reference::name` and, once the switch above is on, `perch::name`.
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
        perch_js_ready! {
            mod perch {
                $(
                    #[test]
                    fn $name() {
                        super::$name(crate::support::Js::Perch)
                    }
                )*
            }
        }
    };
}

mod client;
mod crash;
mod differential;
mod differential_js;
mod jetstream;
mod limits;
mod shards;
mod store_cli;
mod store_faults;
mod support;
