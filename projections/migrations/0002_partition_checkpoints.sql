-- Each view keeps a checkpoint per partition (its projectors share the partitions), in a table of
-- its own schema next to its single `checkpoints` row. Views built before this get the table
-- here; a view's projector fills it on its first run from the view's single checkpoint. New
-- views get it when they are created (`ordo_projections::schema::ensure_view`).
DO $$
DECLARE
    view_schema text;
BEGIN
    FOR view_schema IN
        SELECT nspname FROM pg_namespace
        WHERE nspname LIKE 'view\_%' AND to_regclass(quote_ident(nspname) || '.checkpoints') IS NOT NULL
    LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I.partition_checkpoints (
                 partition   integer PRIMARY KEY,
                 seq         bigint NOT NULL,
                 updated_at  timestamptz NOT NULL DEFAULT now())',
            view_schema);
    END LOOP;
END $$;
