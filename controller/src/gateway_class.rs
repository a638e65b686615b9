//! Which Gateway classes are waypoint classes, shared by the index (which Gateways bind
//! workloads) and the waypoint controller (which Gateways get objects): a class is ours when
//! its GatewayClass names our `controllerName`. Until the GatewayClass object is seen (the
//! controller creates the two built-in ones if missing), the built-in names are ours; a
//! GatewayClass of a built-in name that belongs to another controller is not. A class of any
//! other name with our `controllerName` is a waypoint class of the canonical form.

/// The canonical waypoint class (current Istio).
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The early form our users' YAML still has: no listeners, `istio.io/service-account`.
pub const EARLY_CLASS: &str = "istio-mesh";
/// `controllerName` of our classes (Istio's mesh controller, so Istio's own GatewayClasses of
/// those names are recognised).
pub const CONTROLLER_NAME: &str = "istio.io/mesh-controller";

/// Which of our two Gateway forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `istio-waypoint` (or another class of ours): objects named after the Gateway.
    Canonical,
    /// `istio-mesh`: objects named `<gateway>-waypoint` (such a Gateway is usually named like
    /// the application Service it serves, so the Gateway's own name would collide), running as
    /// the annotated service account.
    Early,
}

/// The form of Gateways of class `class`, whose GatewayClass object names `controller` (None:
/// no such GatewayClass seen), or None when the class is not ours.
pub fn waypoint_form(class: &str, controller: Option<&str>) -> Option<Form> {
    let ours = match controller {
        Some(c) => c == CONTROLLER_NAME,
        None => class == WAYPOINT_CLASS || class == EARLY_CLASS,
    };
    match (ours, class) {
        (false, _) => None,
        (true, EARLY_CLASS) => Some(Form::Early),
        (true, _) => Some(Form::Canonical),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_ours_by_controller_name_then_by_builtin_name() {
        assert_eq!(waypoint_form(WAYPOINT_CLASS, None), Some(Form::Canonical));
        assert_eq!(waypoint_form(EARLY_CLASS, None), Some(Form::Early));
        assert_eq!(waypoint_form("istio", None), None);
        assert_eq!(
            waypoint_form(EARLY_CLASS, Some(CONTROLLER_NAME)),
            Some(Form::Early)
        );
        // A built-in name held by another controller is not ours.
        assert_eq!(
            waypoint_form(WAYPOINT_CLASS, Some("example.com/gateway")),
            None
        );
        // Any class with our controller name is.
        assert_eq!(
            waypoint_form("team-waypoints", Some(CONTROLLER_NAME)),
            Some(Form::Canonical)
        );
    }
}
