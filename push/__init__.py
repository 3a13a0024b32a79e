"""Push when away: notify a device whose user has not received a message in time.

::

    bridge ──COMMIT──▶ messages, cursors (as always; nothing push-specific)
                            │ scanned by
    push daemon(s) ──▶ push_state ──grace over, not delivered──▶ push_outbox
                                                                     │ claimed
                         Web Push / UnifiedPush endpoint ◀── senders.WebPushSender

``config`` (``MQCHAT_PUSH_*``), ``service`` (the daemon), ``senders`` (the
:class:`~push.senders.Sender` interface and Web Push). The decisions live in
``store.push``; endpoint checks (SSRF) in ``core.endpoints``, shared with the API.
"""
