# SNS topics, one SQS queue per (topic, consumer group) subscribed with raw message delivery (the
# SQS body is exactly the published task JSON; attributes arrive as SQS message attributes), and
# behind each queue a dead-letter queue as a backstop (see var.max_receive_count).

resource "aws_sns_topic" "topic" {
  for_each = local.topics

  name = local.sns_name[each.key]
  # Tagged as the bus tags what it creates, so tooling (SnsSqsBus::delete_topics_under) finds it.
  tags = merge(var.tags, { "millrace-topic" = each.key })
}

resource "aws_sqs_queue" "dead_letter" {
  for_each = local.topics

  name                      = "${local.queue_name[each.key]}_dlq"
  message_retention_seconds = 1209600 # 14 days, SQS's maximum
  sqs_managed_sse_enabled   = true
  tags                      = merge(var.tags, { "millrace-topic" = each.key, "millrace-group" = each.value })
}

resource "aws_sqs_queue" "group" {
  for_each = local.topics

  name = local.queue_name[each.key]
  # As the bus creates them: keep unacked messages as long as SQS allows, long polling for other
  # readers. The visibility timeout is set per receive by the bus (from --lease).
  message_retention_seconds  = 1209600
  receive_wait_time_seconds  = 20
  visibility_timeout_seconds = 60
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter[each.key].arn
    maxReceiveCount     = var.max_receive_count
  })
  tags = merge(var.tags, { "millrace-topic" = each.key, "millrace-group" = each.value })
}

# Only this queue's own topic may send to it.
data "aws_iam_policy_document" "queue" {
  for_each = local.topics

  statement {
    sid       = "FromItsTopic"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.group[each.key].arn]
    principals {
      type        = "Service"
      identifiers = ["sns.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [aws_sns_topic.topic[each.key].arn]
    }
  }
}

resource "aws_sqs_queue_policy" "group" {
  for_each = local.topics

  queue_url = aws_sqs_queue.group[each.key].id
  policy    = data.aws_iam_policy_document.queue[each.key].json
}

resource "aws_sns_topic_subscription" "group" {
  for_each = local.topics

  topic_arn            = aws_sns_topic.topic[each.key].arn
  protocol             = "sqs"
  endpoint             = aws_sqs_queue.group[each.key].arn
  raw_message_delivery = true

  depends_on = [aws_sqs_queue_policy.group]
}
