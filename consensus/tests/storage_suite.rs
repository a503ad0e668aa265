//! openraft's own storage test suite, run against the sled log store and state machine.

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;
use warren_consensus::log_store::{LogOptions, LogStore, StorageIo};
use warren_consensus::state_machine::StateMachine;
use warren_consensus::storage::Store;
use warren_consensus::types::{StorageError, TypeConfig};

struct SledBuilder(StorageIo);

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log_db = Store::open(&dir.path().join("log")).expect("open sled");
        let state_db = Store::open(&dir.path().join("state")).expect("open sled");
        let options = LogOptions {
            io: self.0,
            ..LogOptions::default()
        };
        let log = LogStore::open(&log_db, options).expect("open log");
        let (sm, _) = StateMachine::open(&state_db, self.0).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_storage_passes_the_openraft_suite() {
    Suite::test_all(SledBuilder(StorageIo::Background)).expect("storage suite");
}

#[test]
fn sled_storage_with_inline_io_passes_the_openraft_suite() {
    Suite::test_all(SledBuilder(StorageIo::Inline)).expect("storage suite");
}
