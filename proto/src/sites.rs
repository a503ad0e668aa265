//! Which way leads to a site: a sans-IO table of local tunnels and peers' holdings
//! (filled in by issue 13).
