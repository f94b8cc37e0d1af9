//! A `SyncTransaction` does not hand out its SeaORM transaction implicitly: statements run on
//! that would pass the hook-less write guard unseen. `SyncTransaction::unguarded` names it.
use sea_orm::DatabaseTransaction;
use sync_core::SyncTransaction;

fn takes_inner(_: &DatabaseTransaction) {}

fn bypass(txn: &SyncTransaction) {
    takes_inner(&*txn);
    takes_inner(txn);
}

fn main() {}
