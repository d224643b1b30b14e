"""Human approval of "hold" decisions: held flows, approvers on an admin API, persisted grants."""
