//! Prints the objects the waypoint controller would apply for a Gateway, as multi-document
//! YAML, with the controller's own `render` (one source of truth for deploy/examples):
//!
//! ```text
//! cargo run -p controller --example render_waypoint -- deploy/examples/gateway.yaml
//! ```
//!
//! The Gateway needs `metadata.uid` (owner references name it); controller-wide settings come
//! from the same environment variables as the controller (`WAYPOINT_IMAGE`, ...).

use controller::waypoint::gateway::Gateway;
use controller::waypoint::{render, WaypointConfig, WaypointParams};
use std::io::Read;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut text = String::new();
    match std::env::args().nth(1) {
        Some(path) if path != "-" => text = std::fs::read_to_string(&path)?,
        _ => {
            std::io::stdin().read_to_string(&mut text)?;
        }
    }
    let gw: Gateway = serde_yaml_ng::from_str(&text)?;
    if gw.form().is_none() {
        return Err(format!(
            "class {:?} is not a waypoint class (istio-waypoint, istio-mesh)",
            gw.spec.gateway_class_name
        )
        .into());
    }
    let params = WaypointParams::resolve(&gw, &WaypointConfig::from_env(), None)?;
    let mut out = String::new();
    for obj in render(&gw, &params)?.to_values()? {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&obj)?);
    }
    print!("{out}");
    Ok(())
}
