//! Inference traffic: choosing a model server replica for a request (and, later, the weight
//! reload state machine and the load scrapers that feed it).

pub mod load;
pub mod model;
pub mod picker;
pub mod reload;
