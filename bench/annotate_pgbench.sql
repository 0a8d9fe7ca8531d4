-- The raw SQL limit of bench/annotate.py: one claim of :batch items and its submit, the
-- same statements the marketplace's open allocation runs (services/marketplace/service.py,
-- claim_assignments/_allocate and submit_answers), on the same tables, without HTTP,
-- authentication, access checks or an ORM. Run by pgbench (-M prepared) with
-- -D task=<id> -D batch=<B> -D overlap=<K> -D lease=<seconds>, search_path on a scratch
-- schema that the marketplace's own migrations created. Each client is one annotator.

-- claim: the task, then free items locked SKIP LOCKED, recounted under the lock, leased.
BEGIN;
SELECT state, overlap, lease_seconds, reward_per_annotation FROM tasks WHERE id = :task;
SELECT count(*) AS n, coalesce(string_agg(picked.id, ','), '') AS items
  FROM (SELECT items.id FROM items
         WHERE items.task_id = :task AND items.gold IS false AND items.complete IS false
           AND NOT (EXISTS (SELECT 1 FROM assignments
                             WHERE assignments.item_id = items.id
                               AND assignments.annotator_id = 'pgb_' || :client_id))
           AND (SELECT count(*) FROM assignments
                 WHERE assignments.item_id = items.id
                   AND (assignments.status = 'submitted'
                        OR (assignments.status = 'leased' AND assignments.expires_at > now())))
               < :overlap
         ORDER BY items.id
         LIMIT :batch
           FOR UPDATE OF items SKIP LOCKED) AS picked \gset
SELECT item_id, count(*) FROM assignments
 WHERE item_id = ANY (string_to_array(:items, ','))
   AND (status = 'submitted' OR (status = 'leased' AND expires_at > now()))
 GROUP BY item_id;
SELECT item_id FROM assignments
 WHERE item_id = ANY (string_to_array(:items, ',')) AND annotator_id = 'pgb_' || :client_id;
WITH leased AS (
  INSERT INTO assignments (id, task_id, item_id, annotator_id, annotator_firm_id, gold,
                           status, unit_price, leased_at, expires_at)
  SELECT 'asg_' || md5(random()::text || clock_timestamp()::text), :task, item,
         'pgb_' || :client_id, 'firm_pgbench', false, 'leased', 1, now(),
         now() + make_interval(secs => :lease)
    FROM unnest(string_to_array(:items, ',')) AS item
  RETURNING id)
SELECT coalesce(string_agg(id, ','), '') AS leases FROM leased \gset
COMMIT;

-- submit: own leases, the items locked in id order, the leases read again, answers
-- recorded, the items' counters moved, one outbox event per answer.
\if :n > 0
BEGIN;
SELECT state, kind, label_schema, overlap FROM tasks WHERE id = :task;
SELECT id, item_id FROM assignments
 WHERE id = ANY (string_to_array(:leases, ',')) AND task_id = :task
   AND annotator_id = 'pgb_' || :client_id;
SELECT id, input, gold, submitted FROM items
 WHERE id = ANY (string_to_array(:items, ',')) ORDER BY id FOR UPDATE;
SELECT id, status, expires_at FROM assignments WHERE id = ANY (string_to_array(:leases, ','));
UPDATE assignments SET status = 'submitted', submitted_at = now(),
       answer = '{"label": "positive"}'::json
 WHERE id = ANY (string_to_array(:leases, ','));
UPDATE items SET submitted = submitted + 1, complete = submitted + 1 >= :overlap
 WHERE id = ANY (string_to_array(:items, ','));
INSERT INTO outbox (id, type, version, occurred_at, data, attempts)
SELECT 'evt_' || md5(random()::text || a.id), 'assignment.submitted', 1, now(),
       json_build_object('assignment_id', a.id, 'task_id', a.task_id, 'item_id', a.item_id,
                         'annotator_id', a.annotator_id,
                         'annotator_firm_id', a.annotator_firm_id, 'gold', false),
       0
  FROM assignments AS a WHERE a.id = ANY (string_to_array(:leases, ','));
COMMIT;
\endif
