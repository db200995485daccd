-- The fence of the projector's partitions (issue 10, docs/engine.md §3).

-- One row a partition of a layout. Layout 'p1' is one partition, the whole
-- stream (step 3 of docs/engine.md). An instance acquires a partition by
-- raising its epoch (projection.Store.Acquire); every batch it writes
-- first moves applied_seq forward under a compare-and-set on that epoch, in
-- the same transaction as its rows: a batch of an instance whose epoch is no
-- longer the row's updates nothing, and the store rolls it back
-- (projection.ErrFenced).
CREATE TABLE projector_partitions (
    layout      text COLLATE "C" NOT NULL,
    partition   integer NOT NULL,
    epoch       bigint NOT NULL DEFAULT 0,  -- raised by every acquire
    owner       text NOT NULL DEFAULT '',   -- instance id of the last acquire, for logs and status
    applied_seq bigint NOT NULL DEFAULT 0,  -- highest stream sequence a committed batch carried
    acquired_at timestamptz,
    PRIMARY KEY (layout, partition)
);

INSERT INTO projector_partitions (layout, partition) VALUES ('p1', 0);
