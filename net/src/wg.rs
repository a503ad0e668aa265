//! WireGuard peers (sans-IO), filled in by the wg work.
