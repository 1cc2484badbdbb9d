//! Integration tests: the broker and the simulated vendor on port 0,
//! driven over HTTP; `helpers::process` runs the real binary.

mod admin;
mod audit;
mod auth;
mod cli;
mod fairness;
mod fault_proxy;
mod faults;
mod fleet;
mod helpers;
mod hostile;
mod hostile_redis;
mod http_rules;
mod image;
mod invalidation;
mod jwks;
mod lifecycle;
mod logs;
mod metrics;
mod openapi;
mod policy;
mod redis_forms;
mod redis_servers;
mod resilience;
mod rotation;
mod service_accounts;
mod tls;
mod tokens;
mod traces;
mod upstream_failures;
mod validation;
