//! Baton's scheduler: pipeline definitions, the pure planner, the run state
//! machine, its PostgreSQL store, the outbox relay and the `baton` CLI.

pub mod affinity;
pub mod api;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod consumers;
pub mod engine;
pub mod gates;
pub mod metrics;
pub mod pipeline;
pub mod planner;
pub mod relay;
pub mod service;
pub mod state;
pub mod store;
pub mod timing;
pub mod traces;
pub mod window;
