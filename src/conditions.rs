//! What the controller and delivery both need to write status conditions: the list-map
//! merge by type, and a clock at the API server's precision.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Sets `new` in `conditions` (keyed by type), keeping `lastTransitionTime` when the
/// condition's status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
        }
        None => conditions.push(new),
    }
}

/// Seconds-precision "now": the API server stores times to the second, and a desired
/// status built with nanoseconds would never equal what it read back.
pub fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}
