//! bk-cmdb compatibility: envelopes, error codes and messages, the search filter, time
//! formats, and the mapping between REST records and EventSubscription specs.
