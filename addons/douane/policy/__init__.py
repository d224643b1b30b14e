"""Policy: who may do what (grants), what may not pass (deny rules, detectors), how risky it is."""
