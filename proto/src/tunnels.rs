//! Which nodes an agent keeps tunnels to: a sans-IO state machine (filled in by issue 13).
