"""Brokers: the embedded amqtt broker, and the config of the production mosquitto.

::

    account created/changed ──▶ store (argon2 hash, disabled)        (core.accounts)
                   └──▶ mosquitto: dynsec client + per-user role   (core.dynsec)
    device CONNECT ──▶ MqchatBroker gate: throttles, store.accounts, client id owner
                   ──▶ amqtt AccountAuth (what the gate admitted)  (broker.embedded)
    account disabled/deleted/new password ──▶ embedded: dropped at the next poll;
                                              mosquitto: dropped by dynsec
    PUBLISH/SUBSCRIBE ──▶ TopicAcl / dynsec role ──▶ protocol.acl rules
"""
