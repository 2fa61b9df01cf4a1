"""moto_server with SQS calls kept cheap on long queues, for the SNS/SQS tests (scripts/emulator.sh).

moto 5.2 recomputes every queue attribute, the approximate message counts among them, on each
SendMessage and on each message ReceiveMessage hands out (to look up ContentBasedDeduplication
and MessageRetentionPeriod), and each count walks every message in the queue, reading the clock
through a datetime round trip per message. A queue holding N messages thus costs O(N) slow clock
reads per message: with 5,000 queued, ~0.2 s per message and ~15 minutes for the bus
conformance suite's competing-consumers case, which real SQS serves in seconds.

It also makes choosing and deleting messages atomic (see serialize_sqs): moto's requests run on
threads of their own, and without a lock two receives at once can hand out one message twice.

What the speed patches change, and nothing else:
  * the retention-period check reads the queue's retention period instead of building the whole
    attribute dict;
  * the three approximate counts (which `attributes` includes, so SendMessage's lookup of
    ContentBasedDeduplication pays for them) take one pass each against one clock reading,
    with moto's own rules: visible once the clock is past visible_at, delayed while it is
    before delayed_until;
  * the SQS module's millisecond clock is time.time(), the same clock without the datetime
    arithmetic.
Message visibility, delays, receive counts, redrive and deletion are moto's own code, untouched.
Each patch checks the moto internals it relies on and refuses to start, saying which one moved,
when a moto release changes them (scripts/lib/common.sh pins the version these were written for).

Usage: python scripts/moto_server.py [moto_server arguments], e.g. -H 127.0.0.1 -p 5000
"""

import sys
import time


def fail(what):
    sys.exit(f"moto_server.py: {what}; update scripts/moto_server.py for this moto version")


def patch_sqs():
    from moto.sqs import models

    queue = getattr(models, "Queue", None)
    backend = getattr(models, "SQSBackend", None)
    if queue is None or backend is None:
        fail("moto.sqs.models has no Queue or SQSBackend")
    if not callable(getattr(models, "unix_time_millis", None)):
        fail("moto.sqs.models.unix_time_millis is gone")
    if not isinstance(getattr(queue, "attributes", None), property):
        fail("Queue.attributes is no longer a property")
    if not callable(getattr(backend, "is_message_valid_based_on_retention_period", None)):
        fail("SQSBackend.is_message_valid_based_on_retention_period is gone")

    # The clock the message visibility and delay checks read, once per queued message.
    models.unix_time_millis = lambda dt=None: (
        time.time() * 1000.0 if dt is None else models.unix_time(dt) * 1000.0
    )

    def is_message_valid_based_on_retention_period(self, queue_name, message):
        retention = int(self.get_queue(queue_name).message_retention_period)
        return retention + message.sent_timestamp / 1000 > time.time()

    backend.is_message_valid_based_on_retention_period = (
        is_message_valid_based_on_retention_period
    )

    # The three approximate counts moto builds `attributes` from: one pass over the queue each,
    # against one clock reading, with moto's own visibility and delay rules (visible once the
    # clock is past visible_at, delayed while it is before delayed_until).
    def counts(self):
        now = time.time() * 1000.0
        delayed = not_visible = visible = 0
        for message in self._messages:
            is_delayed = now < message.delayed_until
            is_visible = now > message.visible_at
            delayed += is_delayed
            not_visible += not is_visible
            visible += is_visible and not is_delayed
        return delayed, not_visible, visible

    for name in (
        "approximate_number_of_messages_delayed",
        "approximate_number_of_messages_not_visible",
        "approximate_number_of_messages",
    ):
        if not isinstance(getattr(queue, name, None), property):
            fail(f"Queue.{name} is no longer a property")
    queue.approximate_number_of_messages_delayed = property(lambda self: counts(self)[0])
    queue.approximate_number_of_messages_not_visible = property(lambda self: counts(self)[1])
    queue.approximate_number_of_messages = property(lambda self: counts(self)[2])


def serialize_sqs():
    """Makes choosing and deleting messages atomic.

    moto serves each request on a thread of its own, and its ReceiveMessage walks the queue,
    checks each message's visibility and marks it received without a lock: two receives at the
    same moment can both take one message (a duplicate delivery without any fault; a plain boto3
    script with four consumers saw 8 in 5,000). DeleteMessage rebuilds the queue's message list
    from a snapshot, so two deletes at once can bring a deleted message back. Here one lock covers
    a single pass of ReceiveMessage (moto's own code, with no wait) and every add and delete; a
    long poll waits for messages outside the lock and tries again.
    """
    import threading

    from moto.sqs import models

    backend = models.SQSBackend
    queue = models.Queue
    for owner, name in ((backend, "receive_message"), (queue, "delete_message"),
                        (queue, "add_message"), (queue, "wait_for_messages")):
        if not callable(getattr(owner, name, None)):
            fail(f"{owner.__name__}.{name} is gone")

    lock = threading.RLock()
    receive_once = backend.receive_message

    def receive_message(self, queue_name, count, wait_seconds_timeout, visibility_timeout,
                        message_attribute_names=None):
        deadline = time.time() + (wait_seconds_timeout or 0)
        while True:
            with lock:
                result = receive_once(self, queue_name, count, 0, visibility_timeout,
                                      message_attribute_names)
            left = deadline - time.time()
            if result or left <= 0:
                return result
            started = time.time()
            self.get_queue(queue_name).wait_for_messages(min(1.0, left))
            if time.time() >= deadline:
                # As moto's own loop: a wait that ran out ends the poll without another pass, so
                # a message that became visible without a send goes to a poll still waiting.
                return []
            if time.time() - started < 0.01:
                # Visible messages the pass could not take (taken meanwhile): do not spin.
                time.sleep(0.01)

    def locked(method):
        def call(*args, **kwargs):
            with lock:
                return method(*args, **kwargs)

        return call

    backend.receive_message = receive_message
    queue.delete_message = locked(queue.delete_message)
    queue.add_message = locked(queue.add_message)


def main():
    patch_sqs()
    serialize_sqs()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
