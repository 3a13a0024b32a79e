"""Brokers: the embedded amqtt broker, and provisioning of the production mosquitto.

::

    account created ──▶ store (argon2 hash)
                   └──▶ mosquitto: dynsec client + per-user role   (broker.mosquitto)
    device CONNECT ──▶ amqtt AccountAuth ──▶ store.accounts.verify   (broker.embedded)
    PUBLISH/SUBSCRIBE ──▶ TopicAcl / dynsec role ──▶ protocol.acl rules
"""
