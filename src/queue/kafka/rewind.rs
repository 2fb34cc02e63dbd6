//! A partition read past its log's end. A broker that lost its log (or re-created a topic)
//! starts its offsets again from 0, while the member keeps reading, or the group has
//! committed, an offset from before. Kafka answers such a fetch OFFSET_OUT_OF_RANGE and
//! the client resets to `auto.offset.reset`; Tansu answers it with no records and no
//! error, so the partition delivers nothing until its new log grows past the old offset
//! (seen in the chaos suite: committed 12 with the log's end at 9, fetched at 12 for 90 s).
//! The member looks for this now and then, and reads such a partition again from the start
//! of its log: every message in it may be one not yet done, and a repeat is harmless (the
//! claim is conditional, a finished job's message is acknowledged).

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use super::Consumer_;

/// Longest each request to the broker may take here.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An assigned partition whose reading offset lies past its log's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PastTheEnd {
    pub topic: String,
    pub partition: i32,
    /// Where the member reads (or, having read nothing since its assignment, where the
    /// group committed).
    pub at: i64,
    /// The log's start and end.
    pub low: i64,
    pub high: i64,
}

/// Whether reading at `at` is past a log that ends at `high`.
pub(super) fn past_the_end(at: Option<i64>, high: i64) -> bool {
    at.is_some_and(|at| at > high)
}

/// The assigned partitions `consumer` reads past their log's end. Blocking: each request is
/// bounded by [`REQUEST_TIMEOUT`].
pub(super) fn find(consumer: &Consumer_) -> KafkaResult<Vec<PastTheEnd>> {
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(Vec::new());
    }
    // Where the member stands is read before the log's end, so a message published in
    // between cannot make a healthy partition look past its end.
    let positions = consumer.position()?;
    let committed = consumer.committed(REQUEST_TIMEOUT)?;
    let mut past = Vec::new();
    for element in assignment.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let offset = |list: &TopicPartitionList| match list.find_partition(topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(offset)) => Some(offset),
            _ => None,
        };
        let at = offset(&positions).or_else(|| offset(&committed));
        if at.is_none() {
            continue;
        }
        let (low, high) = consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?;
        if past_the_end(at, high) {
            past.push(PastTheEnd { topic: topic.to_owned(), partition, at: at.unwrap_or_default(), low, high });
        }
    }
    Ok(past)
}

/// Read `partition` again from the start of its log, and let that be what the group
/// commits for it (the old offset means nothing in the new log).
pub(super) fn rewind(consumer: &Consumer_, partition: &PastTheEnd) -> KafkaResult<()> {
    consumer.seek(&partition.topic, partition.partition, Offset::Offset(partition.low), REQUEST_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(partition.low))?;
    consumer.store_offsets(&tpl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_offset_beyond_the_end_is_past_it() {
        assert!(!past_the_end(None, 0), "nothing read, nothing committed");
        assert!(!past_the_end(Some(9), 9), "at the end: waiting for the next message");
        assert!(!past_the_end(Some(3), 9));
        assert!(past_the_end(Some(12), 9), "the log was lost and is shorter now");
        assert!(past_the_end(Some(1), 0), "the log was lost and is empty");
    }
}
